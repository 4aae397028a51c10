"""Plane and surface files for other tools: ParaView (VTK XML files) and a browser (an interactive HTML figure).

Both read the file through ``plots.grid_view``, so they show exactly what the PNG shows. VTK files are written
by hand (a documented XML format; arrays inline as base64 little-endian float64, so NaN cells stay NaN); the
HTML figure is drawn by plotly, an optional extra (``pip install mctool[html]``).
"""

from __future__ import annotations

import base64
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from .errors import ConfigError
from .fileio import atomic_path, writes_files
from .plots import GridView, capped, grid_view, lone_cells


def _array(name: str | None, values: np.ndarray, components: int = 1) -> str:
    """One VTK XML DataArray: float64, inline binary (a UInt32 byte count, then the data, base64 together)."""
    raw = np.ascontiguousarray(values, dtype="<f8").tobytes()
    body = base64.b64encode(np.uint32(len(raw)).tobytes() + raw).decode("ascii")
    named = f" Name={quoteattr(name)}" if name else ""
    return (f'<DataArray type="Float64"{named} NumberOfComponents="{components}" format="binary">{body}'
            "</DataArray>")


def _document(kind: str, body: str) -> str:
    return (f'<?xml version="1.0"?>\n<VTKFile type="{kind}" version="1.0" byte_order="LittleEndian" '
            f'header_type="UInt32">\n{body}\n</VTKFile>\n')


def _write_text(path: Path, text: str) -> None:
    if writes_files():
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")


def vtk_points_path(path: str | Path) -> Path:
    """Where ``--vtk PATH`` puts the marked points and the projected curve or trajectory: ``NAME-points.vtp``."""
    path = Path(path)
    return path.with_name(path.stem + "-points.vtp")


def write_vtk(view: GridView, path: str | Path) -> Path:
    """The grid as a VTK structured grid (``.vts``): points (x, y, 0), every metric as point data (NaN where not
    computed; ParaView's 'Warp By Scalar' lifts the surface). The points and the path go to a polydata file beside
    it (``vtk_points_path``): vertices named by a ``label`` index, and the path as one polyline. Returns that
    file's path."""
    x = view.x
    y = view.y if view.y is not None else np.zeros(1)
    nx, ny = len(x), len(y)
    xx, yy = np.meshgrid(x, y, indexing="xy")  # VTK order: x runs fastest
    coords = np.stack([xx.ravel(), yy.ravel(), np.zeros(nx * ny)], axis=1)
    data = []
    for name, z in view.z.items():
        grid = z if view.y is not None else z[:, None]
        data.append(_array(name.replace("/", "_"), grid.T.ravel()))
    if view.split + "/err" in view.z:
        data.append(_array(f"{view.split}_err_percent", 100 * (view.z[view.split + "/err"] if view.y is not None
                                                               else view.z[view.split + "/err"][:, None]).T.ravel()))
    extent = f"0 {nx - 1} 0 {ny - 1} 0 0"
    _write_text(Path(path), _document("StructuredGrid", (
        f'<StructuredGrid WholeExtent="{extent}">\n<Piece Extent="{extent}">\n'
        f'<PointData Scalars="train_loss">\n' + "\n".join(data) + "\n</PointData>\n"
        f"<Points>\n{_array(None, coords, 3)}\n</Points>\n</Piece>\n</StructuredGrid>")))

    def padded(p: np.ndarray) -> np.ndarray:  # (x, y, 0) whatever the grid's dimension
        out = np.zeros((len(p), 3))
        out[:, :p.shape[1]] = p
        return out

    marks = padded(view.points)
    path_pts = padded(view.path) if view.path is not None else np.zeros((0, 3))
    pts = np.vstack([marks, path_pts])
    k, n = len(marks), len(path_pts)
    int_array = lambda name, v: (f'<DataArray type="Int64" Name="{name}" format="ascii">'  # noqa: E731
                                 + " ".join(str(int(i)) for i in v) + "</DataArray>")
    verts = f"<Verts>\n{int_array('connectivity', range(k))}\n{int_array('offsets', range(1, k + 1))}\n</Verts>\n"
    lines = (f"<Lines>\n{int_array('connectivity', range(k, k + n))}\n{int_array('offsets', [n])}\n</Lines>\n"
             if n else "")
    labels = np.concatenate([np.arange(k), np.full(n, -1)]).astype(np.float64)
    out = vtk_points_path(path)
    _write_text(out, _document("PolyData", (
        f'<PolyData>\n<Piece NumberOfPoints="{k + n}" NumberOfVerts="{k}" NumberOfLines="{1 if n else 0}" '
        'NumberOfStrips="0" NumberOfPolys="0">\n'
        f'<PointData Scalars="label">\n{_array("label", labels)}\n</PointData>\n'
        f"<Points>\n{_array(None, pts, 3)}\n</Points>\n{verts}{lines}</Piece>\n</PolyData>")))
    return out


def check_html(view: GridView) -> None:
    """Refuse ``--html`` before anything is drawn or written: a 1-D surface, or plotly (an optional extra) missing."""
    if view.y is None:
        raise ConfigError("--html draws 2-D grids (plane files and 2-D surfaces); this surface is 1-D.")
    try:
        import plotly.graph_objects  # noqa: F401
        import plotly.subplots  # noqa: F401
    except ImportError:
        raise ConfigError("--html needs plotly, an optional extra: pip install 'mctool[html]' (or pip install "
                          "plotly).") from None


def write_html(view: GridView, path: str | Path) -> None:
    """An interactive figure (plotly): the train loss and the evaluation error as rotatable 3-D surfaces side by
    side, the points and the curve or trajectory drawn on the floor; hovering shows the values. The file holds
    plotly's JavaScript, so it opens without internet."""
    check_html(view)
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    split = view.split
    panels = [(view.z["train/loss"], "train loss"), (100 * view.z[f"{split}/err"], f"{split} error (%)")]
    fig = make_subplots(rows=1, cols=2, specs=[[{"type": "surface"}, {"type": "surface"}]],
                        subplot_titles=[title for _, title in panels], horizontal_spacing=0.02)
    notes = [view.note] if view.note else []
    for col, (z, title) in enumerate(panels, start=1):
        shown, top, over = capped(view, z)  # cells above the contours' top level drawn at it; hovering says
        if over:
            notes.append(f"{title}: {over:,} {'cell' if over == 1 else 'cells'} above {top:.4g} drawn at it")
        zt = np.where(np.isfinite(shown), shown, None).T.tolist()  # NaN cells become gaps
        true = [[None if np.isnan(v) else f"{v:.4g}" for v in row] for row in z.T.tolist()]  # hover: inf as inf
        fig.add_trace(go.Surface(x=view.x, y=view.y, z=zt, customdata=true, colorscale="Viridis", name=title,
                                 colorbar={"x": 0.46 if col == 1 else 1.0, "len": 0.8, "title": {"text": title}},
                                 hovertemplate="x %{x:.4g}<br>y %{y:.4g}<br>" + title
                                 + " %{customdata}<extra></extra>"),
                      row=1, col=col)
        alone = lone_cells(shown, corners=4)  # a face needs four computed corners: lone cells as markers
        if alone.any():
            xx, yy = np.meshgrid(view.x, view.y, indexing="ij")
            lo, hi = float(np.nanmin(shown)), float(np.nanmax(shown))
            fig.add_trace(go.Scatter3d(x=xx[alone], y=yy[alone], z=shown[alone], mode="markers",
                                       marker={"size": 5, "symbol": "square", "color": shown[alone],
                                               "colorscale": "Viridis", "cmin": lo, "cmax": hi},
                                       customdata=[f"{v:.4g}" for v in z[alone]], name="computed cells",
                                       showlegend=False,
                                       hovertemplate=title + " %{customdata}<extra></extra>"),
                          row=1, col=col)
        floor = float(np.nanmin(shown)) if np.isfinite(shown).any() else 0.0
        if view.path is not None:
            fig.add_trace(go.Scatter3d(x=view.path[:, 0], y=view.path[:, 1], z=np.full(len(view.path), floor),
                                       mode="lines+markers", line={"color": "crimson", "width": 5},
                                       marker={"size": 2}, name=view.path_label, showlegend=col == 1),
                          row=1, col=col)
        fig.add_trace(go.Scatter3d(x=view.points[:, 0], y=view.points[:, 1], z=np.full(len(view.points), floor),
                                   mode="markers+text", text=view.point_labels, marker={"size": 5, "color": "black"},
                                   name="points", showlegend=col == 1), row=1, col=col)
    scene = {"xaxis": {"title": {"text": view.xlabel}}, "yaxis": {"title": {"text": view.ylabel}}}
    fig.update_layout(title={"text": "; ".join(notes) or f"{view.kind}: train loss and {split} error"},
                      scene=scene, scene2=scene, height=650, margin={"l": 0, "r": 0, "t": 60, "b": 0})
    if writes_files():
        with atomic_path(Path(path)) as tmp:
            # a fixed id for the figure's <div> (plotly draws a random one): the same file draws to the same bytes
            fig.write_html(str(tmp), include_plotlyjs=True, full_html=True, div_id="mctool-surface")


def export_grid(file: str | Path, *, html: str | Path | None = None, vtk: str | Path | None = None,
                view: GridView | None = None) -> Path | None:
    """Write a plane or surface file's HTML figure and/or VTK files (from ``view`` if the caller has read the
    file already); returns the VTK points file (or None)."""
    view = view if view is not None else grid_view(file)
    if html is not None:
        write_html(view, html)
    return write_vtk(view, vtk) if vtk is not None else None
