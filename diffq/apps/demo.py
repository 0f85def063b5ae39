"""``diffq demo``: the main job on the shipped models, offline, in a few minutes on 2 CPU cores.

For each demo model (digits-sd, a UNet; digits-dit, a DiT): calibrate once, quantize with several
presets, generate the same prompts and seeds, score against full precision and with the
digits-clip judge, and write one report (``report.md`` / ``report.html``) with a grid per model.
"""

from __future__ import annotations

import html
from pathlib import Path

from diffq.apps.bench import BenchConfig, BenchResult, run_bench
from diffq.eval.report import html_inline
from diffq.io import write_text_atomic

DEFAULT_RECIPES = ["fp", "w8a8", "w8a8-static", "w4a8", "w4a16", "w4a4", "w4a4-svd", "fp8", "fp4"]
QUICK_RECIPES = ["fp", "w8a8", "w4a4", "w4a4-svd"]


def run_demo(out: str | Path = "runs/demo", models: list[str] | None = None, recipes: list[str] | None = None,
             quick: bool = False, progress: bool = True) -> Path:
    out = Path(out)
    models = models or ["digits-sd", "digits-dit"]
    recipes = recipes or (QUICK_RECIPES if quick else DEFAULT_RECIPES)
    results: list[BenchResult] = []
    for model in models:
        cfg = BenchConfig(
            model=model, recipes=recipes, num_prompts=10 if quick else 20, calib_prompts=8 if quick else 16,
            steps=10 if quick else 20, repeats=1 if quick else 2, out=str(out / model), progress=progress,
            grid_rows=10,
        )
        res = run_bench(cfg)
        results.append(res)
        if progress:
            print(res.text(), flush=True)
    write_demo_report(out, results)
    return out


def write_demo_report(out: Path, results: list[BenchResult]) -> None:
    md = ["# diffq demo report", "",
          ("Each model is quantized with every preset; images use the same prompts and seeds as full "
           "precision (the `fp` column: the model as loaded, float32 on CPU). PSNR/SSIM compare with full "
           "precision; CLIP score and digit accuracy use the digits-clip judge."), ""]
    body = ["<h1>diffq demo report</h1>", f"<p>{html_inline(md[2])}</p>"]
    for res in results:
        rel = Path(res.out).name
        rows = res.table_rows()
        cols = list(rows[0]) if rows else []
        md += [f"## {res.model}", "", f"![{res.model} grid]({rel}/grid.png)", "",
               "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
        md += ["", *[f"_{n}_" for n in res.notes], "", f"Details: [{rel}/report.html]({rel}/report.html)", ""]
        body += [f"<h2>{html.escape(res.model)}</h2>", f'<img src="{rel}/grid.png" alt="grid" style="max-width:100%">',
                 "<table border=1 cellpadding=4><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"]
        body += ["<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in cols) + "</tr>" for r in rows]
        body += ["</table>", *[f"<p><i>{html_inline(n)}</i></p>" for n in res.notes],
                 f'<p><a href="{rel}/report.html">details</a></p>']
    write_text_atomic(out / "report.md", "\n".join(md) + "\n")
    write_text_atomic(out / "report.html", "<!doctype html><html><head><meta charset='utf-8'><title>diffq demo"
                      "</title></head><body>" + "\n".join(body) + "</body></html>\n")
