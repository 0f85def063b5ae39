"""Prompt lists for the CLI: a file or a built-in set, cut to the number asked for."""

from __future__ import annotations

from diffq.errors import DiffqError


def prompt_list(source: str, n: int | None = None) -> list[str]:
    """``source``: a .txt/.csv/.jsonl file or a built-in set name; the first ``n`` prompts, cycling
    through the set when it is shorter than ``n``."""
    from diffq.eval import load_prompts

    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DiffqError(f"number of prompts must be an integer >= 1, got {n!r}")
    prompts = list(load_prompts(source))
    if not prompts:
        raise DiffqError(f"prompt source {source!r} holds no prompts")
    if n is None:
        return prompts
    return [prompts[i % len(prompts)] for i in range(n)]
