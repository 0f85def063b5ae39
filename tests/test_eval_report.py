"""Reports: image grid geometry and cell placement, report.md / report.html contents, the plot."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from PIL import Image

from diffq.errors import ShapeError
from diffq.eval import image_grid, plot_quality_vs_size, save_png, write_report
from diffq.eval.features import EvalInputError


def _solid(r: int, c: int, size: int = 32) -> torch.Tensor:
    """A [3, size, size] image whose colour encodes (row, column)."""
    colour = torch.tensor([(40 * r + 10) / 255, (40 * c + 10) / 255, 200 / 255])
    return colour[:, None, None].expand(3, size, size).clone()


def _rgb(r: int, c: int) -> tuple[int, int, int]:
    return (40 * r + 10, 40 * c + 10, 200)


def test_grid_without_labels_has_exact_size_and_cells_in_place():
    rows, cols, pad = 3, 4, 4
    grid = image_grid([[_solid(r, c) for c in range(cols)] for r in range(rows)], pad=pad)
    k = 2  # 32 px cells are enlarged to >= 64 px
    cell = 32 * k
    assert grid.mode == "RGB"
    assert grid.size == (pad + cols * (cell + pad), pad + rows * (cell + pad)) == (276, 208)
    for r in range(rows):
        for c in range(cols):
            x0, y0 = pad + c * (cell + pad), pad + r * (cell + pad)
            for dx, dy in ((0, 0), (cell - 1, cell - 1), (cell // 2, cell // 3)):
                assert grid.getpixel((x0 + dx, y0 + dy)) == _rgb(r, c)
            assert grid.getpixel((x0 - 1, y0 - 1)) == (255, 255, 255)  # padding stays white


def test_grid_scale_and_mixed_inputs():
    pil = Image.new("RGB", (16, 16), (1, 2, 3))
    grid = image_grid([[pil, _solid(0, 1, 16)]], scale=3, pad=0)
    assert grid.size == (2 * 48, 48)
    assert grid.getpixel((47, 47)) == (1, 2, 3) and grid.getpixel((48, 0)) == _rgb(0, 1)


def test_grid_with_labels_grows_and_keeps_cell_order():
    rows, cols = 2, 3
    imgs = [[_solid(r, c) for c in range(cols)] for r in range(rows)]
    plain = image_grid(imgs)
    labelled = image_grid(imgs, row_labels=["the digit 1 written thick and slanted", "the digit 2"],
                          col_labels=["fp16", "w8a8", "w4a4-svd"])
    assert labelled.width > plain.width and labelled.height > plain.height
    # every cell colour appears, and cells are ordered left->right, top->bottom
    found = {}
    for y in range(0, labelled.height, 2):
        for x in range(0, labelled.width, 2):
            px = labelled.getpixel((x, y))
            for r in range(rows):
                for c in range(cols):
                    if px == _rgb(r, c) and (r, c) not in found:
                        found[(r, c)] = (x, y)
    assert set(found) == {(r, c) for r in range(rows) for c in range(cols)}
    for r in range(rows):
        xs = [found[(r, c)][0] for c in range(cols)]
        assert xs == sorted(xs) and len(set(xs)) == cols
    assert found[(1, 0)][1] > found[(0, 0)][1]
    # some text pixels (dark) were drawn left of the first column and above the first row
    x00, y00 = found[(0, 0)]
    assert any(sum(labelled.getpixel((x, y))) < 200 for x in range(x00 - 1) for y in range(labelled.height))
    assert any(sum(labelled.getpixel((x, y))) < 200 for x in range(labelled.width) for y in range(y00 - 1))


def test_grid_rejects_ragged_rows_and_label_mismatch():
    a = _solid(0, 0)
    with pytest.raises(ShapeError, match="every grid row"):
        image_grid([[a, a], [a]])
    with pytest.raises(ShapeError, match="row labels"):
        image_grid([[a]], row_labels=["x", "y"])
    with pytest.raises(ShapeError, match="column labels"):
        image_grid([[a, a]], col_labels=["x"])
    with pytest.raises(EvalInputError):
        image_grid([])
    with pytest.raises(ShapeError, match="one image"):
        image_grid([[torch.rand(2, 3, 8, 8)]])


class _Tables(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.imgs: list[dict] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.imgs.append(dict(attrs))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_write_report_markdown_and_html_with_grid_table_and_plot(tmp_path):
    out = tmp_path / "report dir"  # a space: links must be URL-quoted
    grid = image_grid([[_solid(r, c) for c in range(3)] for r in range(2)], row_labels=["p0", "p1"],
                      col_labels=["fp16", "w8a8", "<w4a4|svd>"])
    save_png(grid, out / "grid.png")
    table = [
        {"recipe": "fp16", "psnr": math.inf, "clip": 31.23456, "lpips": None, "MiB": 3},
        {"recipe": "w8a8", "psnr": 38.123456, "clip": 31.0, "lpips": 0.0123456, "MiB": 1},
        {"recipe": "<w4a4|svd>", "psnr": 27.5, "clip": float("nan"), "lpips": 0.08, "MiB": 0.75, "note": "a&b"},
    ]
    plot = plot_quality_vs_size([{"recipe": r["recipe"], "size_ratio": 3 / r["MiB"], "psnr": r["psnr"]}
                                 for r in table], out_png=out / "quality_vs_size.png")
    paths = write_report(out, title="diffq bench: <tiny>", grid_png="grid.png", metrics_table=table,
                         plots=[plot], notes=["ran on CPU & slow"])
    assert set(paths) == {"md", "html"} and paths["md"].is_file() and paths["html"].is_file()
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "quality_vs_size.png", "report.html", "report.md"]

    md = paths["md"].read_text()
    assert md.startswith("# diffq bench: <tiny>\n")
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert lines[0] == "| recipe | psnr | clip | lpips | MiB | note |"
    assert lines[2] == "| fp16 | inf | 31.23 | - | 3 | - |"
    assert lines[3] == "| w8a8 | 38.12 | 31 | 0.01235 | 1 | - |"
    assert lines[4] == "| <w4a4\\|svd> | 27.5 | - | 0.08 | 0.75 | a&b |"  # the pipe cannot split the row
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert [unquote(x) for x in links] == ["grid.png", "quality_vs_size.png"]
    assert "- ran on CPU & slow" in md

    text = paths["html"].read_text()
    assert "<title>diffq bench: &lt;tiny&gt;</title>" in text and "<w4a4" not in text
    parser = _Tables()
    parser.feed(text)
    assert parser.rows[0] == ["recipe", "psnr", "clip", "lpips", "MiB", "note"]
    assert parser.rows[1:] == [["fp16", "inf", "31.23", "-", "3", "-"],
                               ["w8a8", "38.12", "31", "0.01235", "1", "-"],
                               ["<w4a4|svd>", "27.5", "-", "0.08", "0.75", "a&b"]]
    srcs = [unquote(i["src"]) for i in parser.imgs]
    assert srcs == ["grid.png", "quality_vs_size.png"]
    for s in srcs:  # the report's images exist, relative to the report
        assert (out / s).is_file()
    with Image.open(out / "grid.png") as im:
        assert im.size == grid.size
    with Image.open(out / "quality_vs_size.png") as im:
        assert im.size == (605, 440)  # 5.5 x 4.0 inches at 110 dpi


def test_report_links_absolute_paths_relative_and_survives_rewrite(tmp_path):
    out = tmp_path / "r"
    other = tmp_path / "elsewhere" / "g.png"
    save_png(image_grid([[_solid(0, 0)]]), other)
    write_report(out, title="t", grid_png=other, metrics_table=[{"a": 1}])
    md = (out / "report.md").read_text()
    assert "](../elsewhere/g.png)" in md
    assert (out / Path("../elsewhere/g.png")).resolve() == other.resolve()
    write_report(out, title="t2", metrics_table=[])  # rewrite in place, empty table
    assert "(no results)" in (out / "report.md").read_text()
    assert "<p>(no results)</p>" in (out / "report.html").read_text()
    assert not list(out.glob(".*"))  # no temp files left


def test_plot_skips_non_finite_points_and_handles_none(tmp_path):
    p = plot_quality_vs_size([{"recipe": "fp", "size_ratio": 1.0, "psnr": math.inf},
                              {"recipe": "x", "size_ratio": None, "psnr": 3.0}], out_png=tmp_path / "p.png")
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (605, 440)


def _dark_columns(img, x0: int, x1: int, y0: int, y1: int) -> list[bool]:
    return [any(sum(img.getpixel((x, y))) < 300 for y in range(y0, y1)) for x in range(x0, x1)]


def test_row_labels_keep_their_word_gaps():
    """PIL's small default font draws a space 1-2 px wide ("the digit0"); labels are drawn word by word."""
    grid = image_grid([[_solid(0, 0)]], row_labels=["the digit 0"], pad=4)
    cols = _dark_columns(grid, 0, 4 + 64, 0, grid.height)
    runs, gap = [], 0
    seen_ink = False
    for dark in cols:
        if dark:
            if seen_ink and gap:
                runs.append(gap)
            gap, seen_ink = 0, True
        elif seen_ink:
            gap += 1
    word_gaps = sorted(runs)[-2:]  # the two widest blank runs inside the label are the word gaps
    assert len(runs) >= 2 and min(word_gaps) >= 3, runs


def test_html_notes_show_code_spans_as_code(tmp_path):
    write_report(tmp_path, title="t", metrics_table=[{"a": 1}], notes=["FID not measured (`--fid-images 0`) & <b>"])
    text = (tmp_path / "report.html").read_text()
    assert "<code>--fid-images 0</code>" in text and "`" not in text and "&amp; &lt;b&gt;" in text
    assert "(`--fid-images 0`)" in (tmp_path / "report.md").read_text()


def test_pareto_front_keeps_the_points_nothing_beats(tmp_path):
    from diffq.eval.report import pareto_front

    pts = [(1.9, 38.0), (3.1, 31.9), (3.1, 31.2), (3.2, 22.0), (2.8, 27.0)]
    assert pareto_front(pts) == [0, 1, 3]
    p = plot_quality_vs_size([{"recipe": "fp", "size_ratio": 1.0, "psnr": math.inf}]
                             + [{"recipe": f"r{i}", "size_ratio": x, "psnr": y} for i, (x, y) in enumerate(pts)],
                             out_png=tmp_path / "p.png")
    with Image.open(p) as im:
        assert im.size == (605, 440)


@pytest.mark.parametrize("repeats", [1, 3])
def test_bench_table_latency_and_unmeasured_columns(repeats):
    from diffq.apps.bench import BenchResult, RecipeResult, _not_measured

    rows = [RecipeResult("fp", psnr=math.inf, ssim=1.0, lpips=0.0, latency_s=1.0, latency_spread_s=0.0),
            RecipeResult("w8a8", psnr=38.0, ssim=0.98, latency_s=0.9, latency_spread_s=0.1, size_ratio=1.9)]
    res = BenchResult("tiny-sd", {"repeats": repeats}, rows, notes=_not_measured(rows, 0, False))
    table = res.table_rows()
    cols = list(table[0])
    assert "LPIPS vs FP" not in cols and "FID" not in cols and "CLIP score" not in cols
    lat = next(c for c in cols if c.startswith("latency"))
    if repeats == 1:
        assert lat == "latency s (one run)" and table[1][lat] == "0.900"
    else:
        assert "±" in lat and table[1][lat] == "0.900 ± 0.050"
    assert any("LPIPS not measured" in n for n in res.notes) and any("FID not measured" in n for n in res.notes)
