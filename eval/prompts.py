"""Prompt sets: built-in ones by name, or files in three formats.

Why a fixed format: the same prompt list (and order -- seeds follow positions) must feed the
full-precision and every quantized run, so prompts live in files that travel with the results.

* ``.txt``   -- one prompt per line; blank lines and lines starting with ``#`` are skipped;
* ``.csv``   -- a header row with a ``prompt`` column (other columns are ignored);
* ``.jsonl`` -- one JSON object per line with a ``"prompt"`` key (blank lines skipped).

Built-in names (:data:`BUILTIN_PROMPT_SETS`): ``"digits"`` -- 50 prompts for the digits demo models
("the digit 7", "a thin, slanted handwritten one", ...), prompt ``i`` asking for digit ``i % 10``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from diffq.errors import DiffqError

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
BUILTIN_PROMPT_SETS: dict[str, Path] = {"digits": PROMPTS_DIR / "digits.txt"}


class PromptSetError(DiffqError, ValueError):
    """A prompt source that does not exist, cannot be parsed, or holds no prompts."""


def _parse_txt(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            out.append(s)
    return out


def _parse_csv(text: str, where: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    if "prompt" not in fields:
        raise PromptSetError(f"{where}: CSV needs a header row with a 'prompt' column, found columns {fields}")
    reader.fieldnames = fields
    return [row["prompt"].strip() for row in reader if row.get("prompt") and row["prompt"].strip()]


def _parse_jsonl(text: str, where: str) -> list[str]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptSetError(f"{where}:{n}: not valid JSON ({e.msg}); write one object per line") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise PromptSetError(f'{where}:{n}: each line must be an object with a string "prompt" key')
        if obj["prompt"].strip():
            out.append(obj["prompt"].strip())
    return out


def load_prompts(path_or_name: str | os.PathLike) -> list[str]:
    """Prompts from a built-in set name (``"digits"``) or a ``.txt`` / ``.csv`` / ``.jsonl`` file.

    Raises :class:`PromptSetError` for a missing file, an unknown extension, a malformed file, or a
    source with no prompts.
    """
    key = str(path_or_name)
    if key in BUILTIN_PROMPT_SETS:
        path = BUILTIN_PROMPT_SETS[key]
    else:
        path = Path(path_or_name).expanduser()
        if not path.is_file():
            raise PromptSetError(f"prompt source {key!r} is neither a built-in set ({', '.join(BUILTIN_PROMPT_SETS)}) "
                                 "nor an existing .txt/.csv/.jsonl file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptSetError(f"{path}: not UTF-8 text ({e.reason}); save the prompt file as UTF-8") from e
    if suffix == ".txt":
        prompts = _parse_txt(text)
    elif suffix == ".csv":
        prompts = _parse_csv(text, str(path))
    elif suffix == ".jsonl":
        prompts = _parse_jsonl(text, str(path))
    else:
        raise PromptSetError(f"{path}: unknown prompt file type {suffix!r}; use .txt, .csv or .jsonl")
    if not prompts:
        raise PromptSetError(f"{path} holds no prompts; add one prompt per line (.txt), rows under a 'prompt' "
                             'column (.csv) or {"prompt": ...} lines (.jsonl)')
    return prompts


def prompt_list(source: str | os.PathLike, n: int | None = None) -> list[str]:
    """The first ``n`` prompts of ``source`` (a file or a built-in set name), cycling through the set
    when it is shorter than ``n``; all of them when ``n`` is None."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise PromptSetError(f"number of prompts must be an integer >= 1, got {n!r}")
    prompts = load_prompts(source)  # never empty: it refuses an empty source
    if n is None:
        return prompts
    return [prompts[i % len(prompts)] for i in range(n)]


__all__ = ["BUILTIN_PROMPT_SETS", "PROMPTS_DIR", "PromptSetError", "load_prompts", "prompt_list"]
