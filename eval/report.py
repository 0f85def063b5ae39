"""Reports: an image grid (rows prompts, columns recipes), a quality-vs-size plot, report.md/.html.

Why both Markdown and HTML: Markdown reads well on GitHub and in a terminal; the HTML file is
self-contained (inline CSS, no scripts, images by relative link) so the whole output folder can be
zipped, attached or served as is.  All text is escaped; every file is written atomically (temporary
name in the same folder, then ``os.replace``) so an interrupted run never leaves a truncated report.

Table cells: strings are shown as given (callers pre-format numbers the way they want), floats as
``{:.4g}``, ``None``/NaN as ``-``. Notes may mark code with backticks: Markdown keeps them, HTML shows
them as ``<code>``.

Labels in the grid are drawn word by word with a gap of at least a third of the line height: PIL's
small default font renders a space one or two pixels wide, which made "the digit 0" read "the digit0".
"""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from diffq.errors import ShapeError
from diffq.eval.features import EvalInputError, to_tensor_batch
from diffq.io import atomic_path, write_text_atomic
from diffq.plotting import new_figure, save_figure

MIN_CELL_PX = 64
MAX_ROW_LABEL_PX = 220


# ----------------------------------------------------------------------------------- image grid
def _to_pil(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    t = to_tensor_batch(image)
    if len(t) != 1:
        raise ShapeError(f"a grid cell holds one image, got a batch of {len(t)}")
    arr = (t[0].permute(1, 2, 0).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _word_w(draw, word: str, font) -> int:
    box = draw.textbbox((0, 0), word, font=font)
    return box[2] - box[0]


def _gap(draw, font) -> int:
    """Pixels between words: the font's space, but never less than a third of a line."""
    line = draw.textbbox((0, 0), "Ag", font=font)[3]
    return max(_word_w(draw, "a a", font) - _word_w(draw, "aa", font), line // 3, 3)


def _text_w(draw, text: str, font) -> int:
    words = str(text).split()
    if not words:
        return 0
    return sum(_word_w(draw, w, font) for w in words) + _gap(draw, font) * (len(words) - 1)


def _draw_text(draw, xy: tuple[int, int], text: str, font) -> None:
    """Draw ``text`` at ``xy`` word by word with :func:`_gap` between words."""
    x, y = xy
    gap = _gap(draw, font)
    for w in str(text).split():
        draw.text((x, y), w, fill="black", font=font)
        x += _word_w(draw, w, font) + gap


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels, at most ``max_lines`` lines (last one cut with '...')."""
    words, lines, cur = str(text).split(), [], ""
    for w in words:
        cand = f"{cur} {w}".strip()
        if not cur or _text_w(draw, cand, font) <= width:
            cur = cand
        else:
            lines.append(cur)
            cur = w
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1] + "..."
    out = []
    for ln in lines:  # a single over-long word: cut characters
        while len(ln) > 1 and _text_w(draw, ln, font) > width:
            ln = ln[:-4] + "..." if len(ln) > 4 else ln[:-1]
        out.append(ln)
    return out


def image_grid(rows_of_images: Sequence[Sequence[Any]], row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None, *, scale: int | None = None, pad: int = 4):
    """A labelled grid as a PIL RGB image: ``rows_of_images[r][c]`` is drawn at row ``r``, column ``c``.

    Cells are any single image :func:`to_tensor_batch` accepts (``[3, H, W]`` in [0, 1], PIL, ...).
    Small images are enlarged by an integer ``scale`` (nearest neighbour; default: the smallest that
    makes a cell >= 64 px) so 32x32 digits stay legible.  Labels use PIL's default font; row labels
    (prompts) wrap to at most 220 px, column labels (recipes) to the cell width.
    """
    from PIL import Image, ImageDraw, ImageFont

    rows = [list(r) for r in rows_of_images]
    if not rows or not rows[0]:
        raise EvalInputError("image_grid needs at least one row with one image")
    ncol = len(rows[0])
    if any(len(r) != ncol for r in rows):
        raise ShapeError(f"every grid row needs {ncol} images, got row lengths {[len(r) for r in rows]}")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ShapeError(f"{len(rows)} rows but {len(row_labels)} row labels")
    if col_labels is not None and len(col_labels) != ncol:
        raise ShapeError(f"{ncol} columns but {len(col_labels)} column labels")
    cells = [[_to_pil(im) for im in r] for r in rows]
    h = max(im.height for r in cells for im in r)
    w = max(im.width for r in cells for im in r)
    k = scale or max(1, math.ceil(MIN_CELL_PX / max(h, w)))
    ch, cw = h * k, w * k

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = probe.textbbox((0, 0), "Ag,|", font=font)[3] + 2
    if col_labels is not None:
        cw = max(cw, min(max(_text_w(probe, str(c), font) for c in col_labels) + 2, 3 * cw))
    label_w = 0
    row_lines: list[list[str]] = []
    if row_labels is not None:
        label_w = min(MAX_ROW_LABEL_PX, max(_text_w(probe, str(s), font) for s in row_labels) + 2)
        row_lines = [_wrap(probe, s, font, label_w, max(1, ch // line_h)) for s in row_labels]
    col_lines: list[list[str]] = []
    head_h = 0
    if col_labels is not None:
        col_lines = [_wrap(probe, c, font, cw, 3) for c in col_labels]
        head_h = max(len(c) for c in col_lines) * line_h + pad

    left = label_w + (pad if label_w else 0)
    width = pad + left + ncol * (cw + pad)
    height = pad + head_h + len(rows) * (ch + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c in range(ncol):
        x0 = pad + left + c * (cw + pad)
        for i, ln in enumerate(col_lines[c] if col_lines else []):
            _draw_text(draw, (x0 + (cw - _text_w(draw, ln, font)) // 2, pad + i * line_h), ln, font)
    for r, row in enumerate(cells):
        y0 = pad + head_h + r * (ch + pad)
        if row_lines:
            lines = row_lines[r]
            ty = y0 + max(0, (ch - len(lines) * line_h) // 2)
            for i, ln in enumerate(lines):
                _draw_text(draw, (pad, ty + i * line_h), ln, font)
        for c, im in enumerate(row):
            big = im.resize((im.width * k, im.height * k), Image.NEAREST) if k > 1 else im
            x0 = pad + left + c * (cw + pad)
            canvas.paste(big, (x0 + (cw - big.width) // 2, y0 + (ch - big.height) // 2))
    return canvas


def save_png(image, path: str | os.PathLike) -> Path:
    """Save a PIL image as PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


# ------------------------------------------------------------------------------------- tables
def format_cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}"
    return str(v)


def _columns(table: Sequence[dict]) -> list[str]:
    cols: list[str] = []
    for row in table:
        for k in row:
            if k not in cols:
                cols.append(k)
    return cols


def _md_cell(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _rel(path: str | os.PathLike, out_dir: Path) -> str:
    p = Path(path)
    if p.is_absolute():
        p = Path(os.path.relpath(p, out_dir.resolve()))
    return p.as_posix()


def markdown_table(table: Sequence[dict]) -> str:
    cols = _columns(table)
    if not cols:
        return "(no results)\n"
    lines = ["| " + " | ".join(_md_cell(str(c)) for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in table:
        lines.append("| " + " | ".join(_md_cell(format_cell(row.get(c))) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def html_table(table: Sequence[dict]) -> str:
    cols = _columns(table)
    if not cols:
        return "<p>(no results)</p>\n"
    e = html.escape
    head = "".join(f"<th>{e(str(c))}</th>" for c in cols)
    body = "\n".join("<tr>" + "".join(f"<td>{e(format_cell(row.get(c)))}</td>" for c in cols) + "</tr>"
                     for row in table)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n"


def html_inline(note: str) -> str:
    """Escaped note text with Markdown code spans (`like this`) as <code>."""
    parts = re.split(r"`([^`]+)`", note)
    return "".join(html.escape(p) if i % 2 == 0 else f"<code>{html.escape(p)}</code>" for i, p in enumerate(parts))


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}img{max-width:100%;image-rendering:pixelated}
.notes li{margin:.3em 0}"""


def write_report(out_dir: str | os.PathLike, *, title: str, grid_png: str | os.PathLike | None = None,
                 metrics_table: Sequence[dict], plots: Sequence[str | os.PathLike] = (),
                 notes: Sequence[str] = ()) -> dict[str, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; returns ``{"md": path, "html": path}``.

    ``metrics_table``: one dict per row (e.g. per recipe), columns in first-appearance order.
    ``grid_png`` / ``plots``: image files, linked relative to ``out_dir`` (pass names inside it).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = ([("image grid", _rel(grid_png, out))] if grid_png else []) + [
        (f"plot {Path(p).stem}", _rel(p, out)) for p in plots]
    table = [dict(r) for r in metrics_table]

    md = [f"# {title}", "", markdown_table(table)]
    if notes:
        md += [f"- {_md_cell(str(n))}" for n in notes] + [""]
    for alt, link in images:
        md += [f"![{alt}]({quote(link)})", ""]
    md_path = write_text_atomic(out / "report.md", "\n".join(md).rstrip() + "\n")

    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>", f"<h1>{e(title)}</h1>",
             html_table(table)]
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{html_inline(str(n))}</li>" for n in notes) + "</ul>")
    for alt, link in images:
        parts.append(f'<figure><img src="{e(quote(link))}" alt="{e(alt)}"><figcaption>{e(alt)}</figcaption></figure>')
    parts += ["</body>", "</html>", ""]
    html_path = write_text_atomic(out / "report.html", "\n".join(parts))
    return {"md": md_path, "html": html_path}


# --------------------------------------------------------------------------------------- plot
AXIS_LABELS = {
    "size_ratio": "size reduction vs bf16 (x, higher = smaller)",
    "psnr": "PSNR vs full precision (dB, higher = closer)",
    "ssim": "SSIM vs full precision (higher = closer)",
}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (both higher = better), by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for x2, y2 in points)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _label_offsets(pts: list[tuple[float, float]], xspan: float, yspan: float) -> list[int]:
    """Vertical offset (points) per label so labels of close points stack instead of overlapping."""
    placed: list[tuple[float, float, int]] = []
    out = []
    for x, y in pts:
        k = sum(1 for px, py, _ in placed if abs(px - x) < 0.06 * xspan and abs(py - y) < 0.06 * yspan)
        placed.append((x, y, k))
        out.append(4 + 10 * k)
    return out


def plot_quality_vs_size(rows: Sequence[dict], x: str = "size_ratio", y: str = "psnr",
                         out_png: str | os.PathLike = "quality_vs_size.png", *, label: str = "recipe",
                         title: str | None = None, xlabel: str | None = None, ylabel: str | None = None) -> Path:
    """Scatter ``rows[i][y]`` against ``rows[i][x]`` (both: higher is better), labels from ``rows[i][label]``,
    with the Pareto front (points no other point beats on both axes) drawn as a line.

    A row whose y is +inf is the reference (full precision: infinite PSNR against itself); it is not a
    point at some made-up height but a dotted vertical line at its x, labelled. Other rows whose x or y
    is missing or not finite are skipped. Labels of points that sit close together are stacked.
    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change); written atomically.
    """
    pts, refs = [], []
    for r in rows:
        try:
            xv, yv = float(r[x]), float(r[y])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(xv) and yv == math.inf:
            refs.append((xv, str(r.get(label, ""))))
        elif math.isfinite(xv) and math.isfinite(yv):
            pts.append((xv, yv, str(r.get(label, ""))))
    fig = new_figure((5.5, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for xv, name in refs:
        ax.axvline(xv, color="0.5", linestyle=":", zorder=1)
        ax.annotate(f"{name} (reference)", (xv, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="0.35")
    if pts:
        coords = [(p[0], p[1]) for p in pts]
        front = pareto_front(coords)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], facecolors="white", edgecolors="tab:blue", zorder=3)
        ax.scatter([pts[i][0] for i in front], [pts[i][1] for i in front], color="tab:blue", zorder=4,
                   label="Pareto front")
        if len(front) > 1:
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="tab:blue", alpha=0.5, zorder=2)
        xs = [p[0] for p in pts] + [r[0] for r in refs]
        ys = [p[1] for p in pts]
        xspan = (max(xs) - min(xs)) or 1.0
        yspan = (max(ys) - min(ys)) or 1.0
        order = sorted(range(len(pts)), key=lambda i: (pts[i][1], pts[i][0]))
        offsets = _label_offsets([coords[i] for i in order], xspan, yspan)
        for i, dy in zip(order, offsets):
            ax.annotate(pts[i][2], pts[i][:2], textcoords="offset points", xytext=(5, dy), fontsize=8)
        ax.legend(loc="best", fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no finite points to plot", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel or AXIS_LABELS.get(x, x.replace("_", " ")))
    ax.set_ylabel(ylabel or AXIS_LABELS.get(y, y.replace("_", " ")))
    ax.set_title(title or "quality vs size (up and right is better)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_png)


__all__ = [
    "format_cell",
    "html_inline",
    "html_table",
    "image_grid",
    "markdown_table",
    "pareto_front",
    "plot_quality_vs_size",
    "save_png",
    "write_report",
]
