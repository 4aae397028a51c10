"""Figures: what they show of extreme, diverged and missing values, of curves off the plane and of overlays."""

import json
import os
import re
import shutil
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest

from matplotlib.collections import PathCollection

import mctool.plots as plots
from mctool.errors import MctoolWarning

CPU = ("--device", "cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_models):
    """A Bezier curve between the two digits networks, its plane (5 x 5), and evaluate-curve files of the
    curve, of the segment between its ends and of a segment between other networks."""
    from conftest import Cli

    cli, folder = Cli(), tmp_path_factory.mktemp("plots")
    curve, plane = folder / "c.safetensors", folder / "p.h5"
    cli("connect", *digits_models, "-o", curve, "--epochs", "1", "--lr", "0.05", "-q", *CPU)
    cli("plane", curve, "-m", plane, "--grid-points", "5", "-q", *CPU)
    other = folder / "o.safetensors"
    cli("train", "-d", "digits", "--arch-kwargs", '{"hidden": 32}', "--epochs", "1", "--seed", "7", "-o", other,
        "-q", *CPU)
    files = {"curve": folder / "curve.h5", "segment": folder / "seg.h5", "other": folder / "other.h5",
             "reverse": folder / "reverse.h5"}
    for name, inputs in (("curve", [curve]), ("segment", digits_models), ("other", [digits_models[0], other]),
                         ("reverse", digits_models[::-1])):
        cli("evaluate-curve", *inputs, "-m", files[name], "--num-points", "3", "-q", *CPU)
    return {"plane": plane, "train_h5": other.with_suffix(".h5"), **files}


@pytest.fixture(autouse=True)
def _close_figures():
    """The figures ``_drawn`` keeps for inspection are closed after each test (pyplot warns past 20 open)."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _drawn(monkeypatch) -> list:
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, *_: figures.append(fig))
    return figures


def _edited(src, dst, **values):
    """A copy of the metrics file ``src`` with ``values`` (dataset -> {index: value}) written into it."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        for name, cells in values.items():
            a = f[name][...]
            for index, value in cells.items():
                a[index] = value
            f[name][...] = a
    return dst


def test_one_diverged_cell_does_not_flatten_the_plane(runs, tmp_path):
    """The levels reached the largest value in the points' box, then the value interpolated along the segment,
    so one cell of 1e6 beside the segment left every other value in a few bands; now a path point counts the
    lowest of the four cells around it."""
    view0 = plots.grid_view(runs["plane"])
    z0 = view0.z["train/loss"]
    # the cell beside the segment's middle: row of the grid nearest v = 0, column nearest the middle of A-B
    i = int(np.argmin(np.abs(view0.x - view0.points[2, 0] / 2)))
    j = int(np.argmin(np.abs(view0.y)))

    def bands(z, levels):
        inside = z[np.isfinite(z) & (z < levels[-1])]
        return len(np.unique(np.searchsorted(levels, inside)))

    unedited = bands(z0, plots._log_levels(z0, keep=plots._kept(view0, z0))[0])
    for cell in ((i, j), (i, min(j + 1, len(view0.y) - 1)), (0, 0)):
        huge = _edited(runs["plane"], tmp_path / "huge.h5", **{"train/loss": {cell: 1e6}})
        view = plots.grid_view(huge)
        z = view.z["train/loss"]
        levels, extend = plots._log_levels(z, keep=plots._kept(view, z))
        assert extend == "max" and levels[-1] < 1e3, cell
        assert bands(z0, levels) >= 0.6 * unedited, cell  # the other values spread over the bands as before


def test_infinite_cells_take_the_top_colour_and_missing_ones_are_hatched(runs, tmp_path, cli, monkeypatch):
    bad = _edited(runs["plane"], tmp_path / "bad.h5", **{"train/loss": {(0, 0): np.inf, (4, 4): np.nan}})
    res = cli("plot", bad, "-o", tmp_path / "bad.png")
    warnings = [w for w in res.stderr.splitlines() if w.startswith("Warning: ")]
    assert warnings == [f"Warning: '{bad}': 1 of 25 grid points have no value (NaN).",
                        f"Warning: '{bad}': 1 of 25 grid points have an infinite train loss (the network diverged); "
                        "they are drawn above every other value."]
    assert "Warning" not in cli("plot", runs["plane"], "-o", tmp_path / "whole.png").stderr
    figures = _drawn(monkeypatch)
    # contourf's own results (matplotlib < 3.8 keeps a ContourSet out of ax.collections)
    from matplotlib.axes import Axes

    contour_sets, contourf = [], Axes.contourf
    monkeypatch.setattr(Axes, "contourf", lambda ax, *a, **k: contour_sets.append((ax, contourf(ax, *a, **k)))
                        or contour_sets[-1][1])
    with pytest.warns(MctoolWarning) as seen:
        plots.plot_grid(bad, tmp_path / "x.png")
    assert len(seen) == 2  # NaN and infinite, as the command said
    fig = figures[0]
    loss_ax = fig.axes[0]
    filled = [c for ax, c in contour_sets if ax is loss_ax and c.filled]
    values, hatched = filled[0], filled[-1]
    assert values.extend == "max"  # the infinite cell: above the top level
    assert hatched.hatches == ["////"]
    assert "not computed (NaN)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_lone_computed_cells_are_drawn(runs, tmp_path, monkeypatch):
    """contourf fills only quads of cells with at least three finite corners: a plane interrupted after one or
    two cells showed nothing but hatching. Such cells are drawn as squares in the colours of the levels."""
    grid = np.full((4, 5), np.nan)
    assert not plots.lone_cells(grid).any()
    grid[0, 0] = grid[0, 1] = 1.0  # two neighbours: no quad with three corners
    grid[3, 4] = 2.0
    assert plots.lone_cells(grid).tolist() == np.isfinite(grid).tolist()
    grid[1, 0] = 3.0  # now three corners of the first quad
    assert np.argwhere(plots.lone_cells(grid)).tolist() == [[3, 4]]
    assert not plots.lone_cells(np.ones((3, 3))).any()

    with h5py.File(runs["plane"]) as f:
        shape = f["train/loss"].shape
    nan = {(i, j): np.nan for i in range(shape[0]) for j in range(shape[1]) if (i, j) != (1, 2)}
    one = _edited(runs["plane"], tmp_path / "one.h5", **{"train/loss": nan, "test/err": nan})
    figures = _drawn(monkeypatch)
    with pytest.warns(MctoolWarning) as seen:
        plots.plot_grid(one, tmp_path / "one.png")
        view = plots.grid_view(one)
    assert {str(w.message) for w in seen} == {f"'{one}': 24 of 25 grid points have no value (NaN)."}
    fig = figures[0]
    for k, (z, *_) in enumerate(plots._panels(view)):
        ax, bar = fig.axes[k], fig.axes[2 + k]
        squares = [c for c in ax.collections if isinstance(c, PathCollection) and c.get_array() is not None]
        assert len(squares) == 1, k
        assert squares[0].get_offsets().tolist() == [[view.x[1], view.y[2]]]
        assert squares[0].get_array().tolist() == [z[1, 2]]
        # one value: a narrow band of levels above it, each level labelled apart on the colorbar
        labels = [t.get_text() for t in bar.get_yticklabels()]
        assert len(set(labels)) == len(labels) > 2, labels


def test_3d_and_html_figures_cap_diverged_cells_and_draw_lone_ones(runs, tmp_path, monkeypatch, cli):
    """A 3-D surface cannot be infinitely high, and one cell of 1e6 flattened the rest into the floor: cells above
    the contour figure's top level are drawn at it and the panel's title says how many. A lone computed cell (no
    face has four computed corners) is drawn as a square."""
    bad = _edited(runs["plane"], tmp_path / "bad.h5", **{"train/loss": {(0, 0): np.inf, (4, 4): 1e6}})
    figures = _drawn(monkeypatch)
    with pytest.warns(MctoolWarning):
        plots.plot_grid(bad, tmp_path / "bad.png", three_d=True)
        view = plots.grid_view(bad)
    ax = figures[0].axes[0]
    _, top, over = plots.capped(view, view.z["train/loss"])
    assert over == 2 and top < 1e3
    assert ax.get_title().endswith(f"(2 cells above {top:.4g} drawn at {top:.4g})")
    assert ax.get_zlim()[1] < 2 * top  # the surface's scale is the other cells', not 1e6's
    assert "above" not in figures[0].axes[2].get_title()  # the error panel has nothing above its levels

    with h5py.File(runs["plane"]) as f:
        shape = f["train/loss"].shape
    nan = {(i, j): np.nan for i in range(shape[0]) for j in range(shape[1]) if (i, j) not in ((1, 2), (1, 3))}
    two = _edited(runs["plane"], tmp_path / "two.h5", **{"train/loss": nan, "test/err": nan})
    with pytest.warns(MctoolWarning):
        plots.plot_grid(two, tmp_path / "two.png", three_d=True)
    ax = figures[1].axes[0]
    squares = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(squares) == 1 and len(squares[0].get_offsets()) == 2

    pytest.importorskip("plotly")
    monkeypatch.undo()  # (figures written again)
    res = cli("plot", bad, "-o", tmp_path / "bad2.png", "--html", tmp_path / "bad.html")
    assert res.stderr.count("Warning: ") == 1  # the infinite cell's, once for the figure and the export
    html = (tmp_path / "bad.html").read_text()
    assert '"customdata":[["inf",' in html and f"train loss: 2 cells above {top:.4g} drawn at it" in html
    assert '"computed cells"' not in html  # every computed cell is a corner of a face
    cli("plot", two, "--html", tmp_path / "two.html")
    html = (tmp_path / "two.html").read_text()
    assert html.count('"name":"computed cells"') == 2  # the two lone cells, in each panel
    cli("plot", two, "--html", tmp_path / "again.html")  # the same bytes (plotly's <div> id was random)
    assert (tmp_path / "again.html").read_bytes() == (tmp_path / "two.html").read_bytes()


def test_3d_flat_surface_is_drawn_in_the_middle_of_its_box(runs, tmp_path, monkeypatch):
    """A surface of one value everywhere (a plateau) sits in the middle of its 3-D box, its points just above it,
    not at the top of a box that hugs the points."""
    with h5py.File(runs["plane"]) as f:
        shape = f["train/loss"].shape
    flat = {(i, j): 2.5 for i in range(shape[0]) for j in range(shape[1])}
    file = _edited(runs["plane"], tmp_path / "flat.h5", **{"train/loss": flat})
    figures = _drawn(monkeypatch)
    plots.plot_grid(file, tmp_path / "flat.png", three_d=True)
    ax = figures[0].axes[0]
    lo, hi = ax.get_zlim()
    assert lo < 2.5 < hi and abs((lo + hi) / 2 - 2.5) < 1e-9 * 2.5
    (marks,) = [line for line in ax.get_lines() if line.get_marker() == "o"]
    heights = np.asarray(marks.get_data_3d()[2])
    assert np.all((heights > 2.5) & (heights < 2.5 + 0.1 * (hi - lo)))


def test_3d_points_over_cells_not_computed_are_hollow_and_the_curve_breaks_there(runs, tmp_path, monkeypatch):
    """An interrupted plane: a point over cells not computed yet was drawn on the floor like one that lies in a
    valley, and the curve ran along the floor there. Now such points are hollow circles and the curve has a gap."""
    with h5py.File(runs["plane"]) as f:
        shape = f["train/loss"].shape
    half = {(i, j): np.nan for i in range(shape[0] // 2, shape[0]) for j in range(shape[1])}
    file = _edited(runs["plane"], tmp_path / "half.h5", **{"train/loss": half, "test/err": half})
    figures = _drawn(monkeypatch)
    with pytest.warns(MctoolWarning):  # (the cells not computed)
        plots.plot_grid(file, tmp_path / "half.png", three_d=True)
        view = plots.grid_view(file)
    on = np.isfinite(plots._on_grid(view.x, view.y, view.z["train/loss"], view.points[:, 0], view.points[:, 1]))
    assert on.any() and not on.all()  # (the test's premise: some points on each side)
    ax = figures[0].axes[0]
    marks = {line.get_markerfacecolor() == "none": line for line in ax.get_lines() if line.get_marker() == "o"}
    assert sorted(marks) == [False, True]
    assert len(marks[False].get_data_3d()[0]) == on.sum() and len(marks[True].get_data_3d()[0]) == (~on).sum()
    (curve,) = [line for line in ax.get_lines() if line.get_marker() in ("None", "", None)]
    heights = np.asarray(curve.get_data_3d()[2], dtype=float)
    assert np.isnan(heights).any() and np.isfinite(heights).any()


def test_the_levels_end_exactly_at_the_extremes():
    """lo + (hi - lo) can round below hi: contourf then left the cells at the maximum blank (a plane's plateau
    of 90% test error, at chance, was a white hole in the panel)."""
    z = np.array([[26.97867137638703, 63.69616873214543], [63.69616873214543, 30.0]])
    assert 26.97867137638703 + (63.69616873214543 - 26.97867137638703) < 63.69616873214543  # the rounding
    levels, extend = plots._log_levels(z)
    assert (levels[0], levels[-1], extend) == (z.min(), z.max(), "neither")
    assert np.all(np.diff(levels) > 0)


def test_labels_numbers():
    assert [plots._times(x) for x in (3.66, 0.251, 110.4, 1234.0, 1.0)] == ["3.7", "0.25", "110", "1,200", "1"]
    assert plots._level_format(np.array([1.0, 2.0, 3.0])) == "%.3g"
    assert plots._level_format(np.array([2.28929, 2.28931, 2.2894])) == "%.6g"


def test_a_curve_off_the_plane_is_named_and_a_stretched_axis_is_said(runs, tmp_path, monkeypatch):
    assert plots.grid_view(runs["plane"]).note == ""  # a one-bend curve lies in its plane
    with h5py.File(runs["plane"]) as f:
        n = len(f["curve_offplane"])
        dx = float(np.hypot(*f["points"][2]))
    off = _edited(runs["plane"], tmp_path / "off.h5", curve_offplane={n // 2: 0.25 * dx})
    assert plots.grid_view(off).note == ("curve projected onto the plane: largest distance from it "
                                         f"{0.25 * dx:.3g} (25.0% of |B - A|); the surface under it is not the "
                                         "curve's loss")
    figures = _drawn(monkeypatch)
    plots.plot_grid(off, tmp_path / "off.png")
    fig = figures[0]
    assert fig._suptitle.get_text().startswith("curve projected onto the plane")
    ax = fig.axes[0]
    box = ax.get_window_extent()
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    stretch = (box.height / (y1 - y0)) / (box.width / (x1 - x0))
    label = ax.get_ylabel()
    assert stretch > 2  # two trained networks are far apart (dx) next to the bend's height (dy)
    said = float(re.search(r"a unit of v drawn ([0-9.,]+)x as long as a unit of u", label).group(1).replace(",", ""))
    assert said == pytest.approx(stretch, rel=0.1)


def test_curves_of_different_pairs_are_named_and_a_diverged_point_is_marked(runs, tmp_path, cli, monkeypatch):
    with h5py.File(runs["curve"]) as a, h5py.File(runs["segment"]) as b, h5py.File(runs["other"]) as c:
        ends = [json.loads(f.attrs["ends_sha256"]) for f in (a, b, c)]
    assert ends[0] == ends[1] != ends[2]  # the curve and the segment between the same networks: one pair
    assert ends[2][0] == ends[0][0] and ends[2][1] != ends[0][1]  # the other segment: the same A, another B
    res = cli("plot", runs["segment"], runs["reverse"], "-o", tmp_path / "back.png")
    assert ("Warning: reverse.h5 runs between the same two networks as the other files, from their B to their A"
            in res.stderr)
    res = cli("plot", runs["segment"], runs["curve"], runs["other"], "-o", tmp_path / "three.png")
    assert "Warning: the files connect 2 different pairs of networks (their ends differ)" in res.stderr
    assert "Warning" not in cli("plot", runs["segment"], runs["curve"], "-o", tmp_path / "two.png").stderr
    # a file given again (here by another name) is drawn once, and said so
    again = Path(runs["segment"]).parent / ".." / Path(runs["segment"]).parent.name / Path(runs["segment"]).name
    res = cli("plot", runs["segment"], runs["curve"], again, "-o", tmp_path / "again.png", "--json")
    said = f"Warning: '{again}' is given again (the same file as an earlier one); each file is drawn once."
    assert said in res.stderr
    assert [f["path"] for f in json.loads(res.stdout)["inputs"]] == [str(runs["segment"]), str(runs["curve"])]
    figures = _drawn(monkeypatch)
    with pytest.warns(MctoolWarning, match="is given again"):
        plots.plot_files([runs["segment"], runs["curve"], again], tmp_path / "again.png", force=True)
    assert [t.get_text().split(",")[0] for t in figures[0].legends[0].get_texts()] == ["segment", "bezier (1 bend)"]
    figures.clear()
    plots.plot_curves([runs["segment"], runs["curve"]], tmp_path / "x.png")
    labels = [t.get_text().split(",")[0] for t in figures[0].legends[0].get_texts()]
    assert labels == ["segment", "bezier (1 bend)"]
    with pytest.warns(MctoolWarning, match="different pairs of networks"):
        plots.plot_curves([runs["segment"], runs["other"]], tmp_path / "x.png")
    labels = [t.get_text().split(",")[0] for t in figures[1].legends[0].get_texts()]
    assert labels == ["seg.h5: segment", "other.h5: segment"]
    inf = _edited(runs["segment"], tmp_path / "inf.h5", **{"train/loss": {1: np.inf}})
    with pytest.warns(MctoolWarning, match="infinite train loss"):
        plots.plot_curves([inf], tmp_path / "x.png")
    ax = figures[2].axes[0]
    marks = [line for line in ax.get_lines() if line.get_marker() == "^"]
    assert len(marks) == 1 and marks[0].get_xdata().tolist() == [0.5]
    assert "diverged (infinite)" in [t.get_text() for t in figures[2].legends[0].get_texts()]


def test_fge_files_show_the_ensemble_and_overlay_their_training_run(cli, tmp_path, digits_models, monkeypatch):
    out = tmp_path / "f.safetensors"
    cli("fge", digits_models[0], "-o", out, "--epochs", "2", "--cycle-epochs", "1", "-q", *CPU)
    fge_h5 = out.with_suffix(".h5")
    figures = _drawn(monkeypatch)
    plots.plot_history([fge_h5], tmp_path / "x.png")
    ens_ax = figures[0].axes[2]
    with h5py.File(fge_h5) as f:
        ensemble, members = f["ensemble/test/err"][...], f["members/test/err"][...]
    lines = ens_ax.get_lines()
    assert lines[0].get_xdata().tolist() == list(range(1, len(ensemble) + 1))
    assert lines[0].get_ydata().tolist() == pytest.approx((100 * ensemble).tolist())
    assert lines[1].get_ydata().tolist() == pytest.approx((100 * members).tolist())
    train_h5 = digits_models[0].with_suffix(".h5")
    plots.plot_history([train_h5, fge_h5], tmp_path / "x.png")  # a run and its FGE continuation
    loss_ax, err_ax, ens_ax = figures[1].axes
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert labels[0] == f"{train_h5.name}: train loss" and f"{fge_h5.name}: train loss" in labels
    by_file: dict[str, set] = {}
    for ax in figures[1].axes:
        for line in ax.get_lines():
            by_file.setdefault(line.get_label().split(":")[0], set()).add(line.get_color())
    assert sorted(by_file) == sorted([train_h5.name, fge_h5.name])
    assert all(len(c) == 1 for c in by_file.values()) and by_file[train_h5.name] != by_file[fge_h5.name]
    monkeypatch.undo()
    r = cli.json("plot", train_h5, fge_h5, "-o", tmp_path / "both.png")
    assert r["kind"] == "history"


def test_dpi_and_pdf_fonts(runs, cli, tmp_path):
    def width(png):
        return struct.unpack(">I", png.read_bytes()[16:20])[0]

    small, large = tmp_path / "s.png", tmp_path / "l.png"
    cli("plot", runs["curve"], "-o", small, "--dpi", "60")
    cli("plot", runs["curve"], "-o", large, "--dpi", "240")
    assert width(large) == 4 * width(small)
    for bad in ("0", "5000"):
        assert "--dpi must be" in cli.error("plot", runs["curve"], "-o", tmp_path / "b.png", "--dpi", bad)
    pdf = tmp_path / "p.pdf"
    cli("plot", runs["curve"], "-o", pdf)
    assert b"/FontFile2" in pdf.read_bytes() and b"/Type3" not in pdf.read_bytes()  # TrueType, not Type 3


def test_figures_say_where_they_came_from(runs, cli, tmp_path):
    """Every figure names mctool's version and the metrics files it was drawn from, with their sha256 (PNG text
    chunks, PDF document information, SVG metadata); the same files still draw to the same bytes."""
    from PIL import Image

    from mctool import __version__
    from mctool.fileio import sha256_file

    source = f"{runs['curve']} (sha256 {sha256_file(runs['curve'])})"
    png = tmp_path / "c.png"
    cli("plot", runs["curve"], "-o", png)
    with Image.open(png) as image:
        assert image.text["Software"] == f"mctool {__version__}" and image.text["Source"] == source
    for ending in ("pdf", "svg"):
        figure = tmp_path / f"c.{ending}"
        cli("plot", runs["curve"], "-o", figure)
        text = figure.read_bytes()
        assert f"mctool {__version__}".encode() in text and sha256_file(runs["curve"]).encode() in text
        again = tmp_path / f"again.{ending}"
        cli("plot", runs["curve"], "-o", again)
        assert again.read_bytes() == text
    both = tmp_path / "both.png"
    cli("plot", runs["segment"], runs["curve"], "-o", both)
    with Image.open(both) as image:
        assert image.text["Source"] == f"{runs['segment']} (sha256 {sha256_file(runs['segment'])}); {source}"
    # a metrics file whose name is not UTF-8 (nor Latin-1) is named with escapes (it was a traceback)
    for name in (os.fsdecode(b"bad\xff.h5"), "\u00fc\u20ac.h5"):
        odd = tmp_path / name
        shutil.copy(runs["curve"], odd)
        for ending in ("png", "pdf", "svg"):
            cli("plot", odd, "-o", tmp_path / f"odd.{ending}", "--force")
        with Image.open(tmp_path / "odd.png") as image:
            assert image.text["Source"].startswith(str(odd).encode("utf-8", "surrogateescape")
                                                   .decode("utf-8", "backslashreplace"))


def test_log_loss_axis(runs, cli, tmp_path, monkeypatch, digits_models):
    cli("plot", runs["curve"], "-o", tmp_path / "ok.png", "--log-loss")
    assert "--log-loss draws the loss of curve, 1-D surface and per-epoch figures" in cli.error(
        "plot", runs["plane"], "-o", tmp_path / "p.png", "--log-loss")
    cli("surface", digits_models[0], "-m", tmp_path / "s2.h5", "--grid-points", "2", "-q", *CPU)
    assert "2-D surface's contour levels" in cli.error("plot", tmp_path / "s2.h5", "-o", tmp_path / "s.png",
                                                       "--log-loss")
    figures = _drawn(monkeypatch)
    plots.plot_curves([runs["curve"]], tmp_path / "c.png", log_loss=True)
    plots.plot_history([runs["train_h5"]], tmp_path / "h.png", log_loss=True)
    plots.plot_curves([runs["curve"]], tmp_path / "d.png")
    assert [f.axes[0].get_yscale() for f in figures] == ["log", "log", "linear"]
    assert [f.axes[1].get_yscale() for f in figures] == ["linear"] * 3  # errors stay linear


def test_log_loss_leaves_out_losses_of_zero(runs, cli, tmp_path):
    """A loss of 0 has no place on a log axis: left out with a warning (matplotlib's own warning leaked, and
    with no positive loss the panel was empty)."""
    zero = tmp_path / "zero.h5"
    zero.write_bytes(runs["train_h5"].read_bytes())
    with h5py.File(zero, "a") as f:
        f["train/loss"][0] = 0.0
    r = cli("plot", zero, "-o", tmp_path / "z.png", "--log-loss")
    assert "Warning: --log-loss: 1 loss value(s) <= 0 are left out of the log axis." in r.output
    assert "UserWarning" not in r.output
    with h5py.File(zero, "a") as f:
        f["train/loss"][:] = 0.0
        f["test/nll"][:] = 0.0
    assert "--log-loss: no loss to draw is above 0" in cli.error("plot", zero, "-o", tmp_path / "z2.png",
                                                                "--log-loss")


def test_a_training_file_with_no_finite_loss_is_nothing_to_draw(runs, cli, tmp_path):
    bad = tmp_path / "nan.h5"
    bad.write_bytes(runs["train_h5"].read_bytes())
    with h5py.File(bad, "a") as f:
        f["train/loss"][:] = np.nan
    assert "nothing to draw: no epoch has a finite train loss" in cli.error("plot", bad, "-o", tmp_path / "x.png")


def test_a_1d_surface_marks_diverged_points_and_shows_the_whole_grid(cli, tmp_path, digits_models, monkeypatch):
    """A 1-D surface's infinite point was a gap (the axis even stopped short of it) although the warning said it
    was drawn above every other value: it is marked at the top of the panel as on curves; --log-loss applies."""
    line = tmp_path / "line.h5"
    cli("surface", digits_models[0], "-m", line, "--dims", "1", "--grid-points", "5", "-q", *CPU)
    bad = _edited(line, tmp_path / "bad.h5", **{"train/loss": {0: np.inf, 4: 1e6}})
    figures = _drawn(monkeypatch)
    with pytest.warns(MctoolWarning, match="1 of 5 grid points have an infinite train loss"):
        plots.plot_grid(bad, tmp_path / "bad.png", log_loss=True)
    x = plots.grid_view(line).x
    loss_ax, err_ax = figures[0].axes
    marks = [ln for ln in loss_ax.get_lines() if ln.get_label() == "diverged (infinite)"]
    assert len(marks) == 1 and marks[0].get_xdata().tolist() == [x[0]] and marks[0].get_marker() == "^"
    for ax in (loss_ax, err_ax):
        lo, hi = ax.get_xlim()
        assert lo < x[0] and hi > x[-1]
    assert loss_ax.get_yscale() == "log" and err_ax.get_yscale() == "linear"



def test_html_without_plotly_is_refused_before_anything_is_written(runs, cli, tmp_path, monkeypatch):
    """plotly is an optional extra: `plot -o FIG --vtk VTS --html HTML` without it wrote the figure, then failed,
    so the rerun after `pip install 'mctool[html]'` was refused because the figure existed."""
    import sys

    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly raises ImportError
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    monkeypatch.setitem(sys.modules, "plotly.subplots", None)
    out = [tmp_path / "p.png", tmp_path / "p.vts", tmp_path / "p.html"]
    err = cli.error("plot", runs["plane"], "-o", out[0], "--vtk", out[1], "--html", out[2])
    assert "--html needs plotly" in err and "mctool[html]" in err
    assert not [p for p in tmp_path.iterdir()], "nothing is written"
