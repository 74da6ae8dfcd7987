"""Pictures and the Markdown report of a run: label overlays on CT slices, metric and timing tables.

* :func:`render_overlay` writes a PNG of one axial or coronal slice of a CT with a label map
  overlaid in colour (and, optionally, the reference labels beside it), with a legend that names
  every label present. The volume is first reoriented to RAS (nibabel's closest canonical
  orientation: flips and axis permutations only, no interpolation), so that the picture has the
  radiological orientation whatever the file's array order: axial slices (fixed z) show anterior
  at the top and the patient's right on the left of the picture; coronal slices (fixed y) show
  superior at the top and the patient's right on the left. Pixels keep their physical aspect.
* Colours (:data:`LABEL_COLORS`) are ITK-SNAP's default label colours, the viewer in which the
  FLARE organisers' figures are usually drawn. A labelled pixel is ``(1 - alpha) * grey +
  alpha * colour`` (:func:`overlay_rgb`), where ``grey`` is the CT in the abdominal window
  :data:`CT_WINDOW` (level 40, width 400 HU) scaled to [0, 255]; unlabelled pixels are grey.
* :func:`write_report` writes ``report.md``: metrics table (FLARE DSC / NSD per class, organ
  and tumor means), timing tables, hardware, settings and the paths of every output.

Files are written atomically (:func:`flare23.io.atomic_path`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from flare23.constants import LABEL_KEYS, LABELS
from flare23.errors import Flare23Error
from flare23.io import atomic_path, atomic_write_text

#: RGB colour of each label (ITK-SNAP's default label table, labels 1-14).
LABEL_COLORS: dict[int, tuple[int, int, int]] = {
    1: (255, 0, 0),
    2: (0, 255, 0),
    3: (0, 0, 255),
    4: (255, 255, 0),
    5: (0, 255, 255),
    6: (255, 0, 255),
    7: (255, 239, 213),
    8: (0, 0, 205),
    9: (205, 133, 63),
    10: (210, 180, 140),
    11: (102, 205, 170),
    12: (0, 0, 128),
    13: (0, 139, 139),
    14: (46, 139, 87),
}
#: CT display window in HU (abdominal soft tissue: level 40, width 400).
CT_WINDOW: tuple[float, float] = (-160.0, 240.0)
#: Opacity of the label colours.
DEFAULT_ALPHA = 0.5
PLANES = ("axial", "coronal")


# --- pixels -------------------------------------------------------------------------------------
def ct_to_grey(image: np.ndarray, window: Sequence[float] = CT_WINDOW) -> np.ndarray:
    """CT (HU) -> grey level in [0, 1]: 0 at ``window[0]`` and below, 1 at ``window[1]`` and above."""
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise Flare23Error(f"CT window {tuple(window)}: the upper bound must exceed the lower one")
    return np.clip((np.asarray(image, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def overlay_rgb(image2d: np.ndarray, labels2d: np.ndarray, window: Sequence[float] = CT_WINDOW, alpha: float = DEFAULT_ALPHA):
    """uint8 RGB picture of a CT slice with its labels: ``round(255 * ((1 - alpha) g + alpha c))``.

    ``g`` is :func:`ct_to_grey` of the CT and ``c`` the label's colour / 255 where the label is in
    :data:`LABEL_COLORS`; elsewhere the pixel is ``round(255 g)`` in all three channels.
    """
    if image2d.shape != labels2d.shape:
        raise Flare23Error(f"overlay: image slice {image2d.shape} and label slice {labels2d.shape} differ in shape")
    if not 0.0 <= float(alpha) <= 1.0:
        raise Flare23Error(f"overlay: alpha {alpha} must lie in [0, 1]")
    grey = ct_to_grey(image2d, window)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    labels2d = np.asarray(labels2d)
    for label, colour in LABEL_COLORS.items():
        mask = labels2d == label
        if mask.any():
            rgb[mask] = (1.0 - alpha) * rgb[mask] + alpha * (np.asarray(colour, dtype=np.float64) / 255.0)
    return np.rint(rgb * 255.0).astype(np.uint8)


# --- geometry -----------------------------------------------------------------------------------
def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The volume in RAS array order (nibabel's closest canonical: flips / permutations only) and its affine."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(volume), np.asarray(affine, dtype=float))
    canonical = nib.as_closest_canonical(img)
    return np.asarray(canonical.dataobj), np.asarray(canonical.affine, dtype=float)


def display_slice(volume_ras: np.ndarray, plane: str, index: int) -> np.ndarray:
    """A 2D slice of a RAS volume as displayed (row 0 at the top, column 0 on the left).

    Axial (fixed z = ``index``): rows from anterior to posterior, columns from the patient's right
    to left. Coronal (fixed y = ``index``): rows from superior to inferior, columns right to left.
    """
    if plane == "axial":
        return volume_ras[::-1, ::-1, index].T
    if plane == "coronal":
        return volume_ras[::-1, index, ::-1].T
    raise Flare23Error(f"plane {plane!r}: expected one of {', '.join(PLANES)}")


def pixel_spacing(affine_ras: np.ndarray, plane: str) -> tuple[float, float]:
    """(row, column) spacing in mm of :func:`display_slice` pictures."""
    sx, sy, sz = np.sqrt((np.asarray(affine_ras, dtype=float)[:3, :3] ** 2).sum(axis=0))
    return (float(sy), float(sx)) if plane == "axial" else (float(sz), float(sx))


def busiest_slice(labels_ras: np.ndarray, plane: str) -> int:
    """Index of the axial (z) or coronal (y) slice with the most labelled voxels (the middle one if none)."""
    axis = 2 if plane == "axial" else 1
    other = tuple(a for a in range(3) if a != axis)
    counts = np.count_nonzero(labels_ras, axis=other)
    if counts.max() == 0:
        return labels_ras.shape[axis] // 2
    return int(np.argmax(counts))


# --- pictures -----------------------------------------------------------------------------------
def render_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    out_png: str | os.PathLike,
    plane: str = "axial",
    *,
    reference: np.ndarray | None = None,
    index: int | None = None,
    window: Sequence[float] = CT_WINDOW,
    alpha: float = DEFAULT_ALPHA,
    title: str | None = None,
    panel_titles: Sequence[str] = ("reference", "prediction"),
    pixels_per_mm: float = 2.0,
) -> dict:
    """Write a PNG of one ``plane`` slice of ``image`` with ``labels`` overlaid; return its layout.

    ``image`` (HU), ``labels`` (and ``reference``, drawn as a first panel when given) share the
    array grid described by ``affine``. ``index`` is the slice index in the RAS-reoriented volume
    (default: :func:`busiest_slice` of the labels, or of the reference when given). The legend
    names, with their colours, the labels present in the shown slice(s).

    Returns ``{"path", "plane", "index", "size": (width, height), "panels": [{"title", "box":
    (left, top, right, bottom) in PNG pixels, "shape": (rows, columns)}]}`` so that a caller can
    find the picture of any voxel.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim != 3 or labels.shape != image.shape:
        raise Flare23Error(f"{out_png}: image {image.shape} and labels {labels.shape} must be 3D volumes of one shape")
    if reference is not None and np.asarray(reference).shape != image.shape:
        raise Flare23Error(f"{out_png}: reference {np.asarray(reference).shape} and image {image.shape} differ in shape")
    if plane not in PLANES:
        raise Flare23Error(f"plane {plane!r}: expected one of {', '.join(PLANES)}")
    image_ras, affine_ras = to_ras(image, affine)
    volumes = [to_ras(labels, affine)[0]]
    titles = [panel_titles[-1]]
    if reference is not None:
        volumes.insert(0, to_ras(np.asarray(reference), affine)[0])
        titles.insert(0, panel_titles[0])
    axis = 2 if plane == "axial" else 1
    if index is None:
        index = busiest_slice(volumes[0], plane)
    if not 0 <= int(index) < image_ras.shape[axis]:
        raise Flare23Error(f"{out_png}: {plane} slice {index} is outside 0..{image_ras.shape[axis] - 1}")
    index = int(index)

    grey = display_slice(image_ras, plane, index)
    slices = [display_slice(v, plane, index) for v in volumes]
    pictures = [overlay_rgb(grey, s, window, alpha) for s in slices]
    present = sorted({int(v) for s in slices for v in np.unique(s) if int(v) in LABEL_COLORS})
    row_mm, col_mm = pixel_spacing(affine_ras, plane)
    rows, cols = grey.shape
    height_mm, width_mm = rows * row_mm, cols * col_mm

    # layout in inches at 100 dpi: panels side by side, legend column on the right
    dpi = 100.0
    panel_w, panel_h = width_mm * pixels_per_mm / dpi, height_mm * pixels_per_mm / dpi
    margin, title_h, legend_w = 0.15, 0.45 + (0.3 if title else 0.0), 2.4
    fig_w = margin + len(pictures) * (panel_w + margin) + legend_w
    fig_h = max(panel_h + title_h + margin, 0.3 + 0.22 * (len(present) + 1))
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    panels = []
    for i, (picture, panel_title) in enumerate(zip(pictures, titles)):
        left = (margin + i * (panel_w + margin)) / fig_w
        bottom = margin / fig_h
        ax = fig.add_axes((left, bottom, panel_w / fig_w, panel_h / fig_h))
        ax.imshow(picture, interpolation="nearest", extent=(0.0, width_mm, height_mm, 0.0), aspect="equal")
        ax.set_axis_off()
        ax.set_title(f"{panel_title}: {plane} slice {index}", fontsize=9)
        panels.append({"title": panel_title, "ax": ax, "shape": (rows, cols)})
    if title:
        fig.suptitle(title, fontsize=10, y=1.0 - 0.12 / fig_h, va="top")
    handles = [Patch(facecolor=np.asarray(LABEL_COLORS[c]) / 255.0, edgecolor="black", label=f"{c} {LABELS[c]}") for c in present]
    if not handles:
        handles = [Patch(facecolor="white", edgecolor="white", label="no label in this slice")]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False, title="labels", title_fontsize=9)

    fig.canvas.draw()
    width_px, height_px = fig.canvas.get_width_height()
    for panel in panels:
        bbox = panel.pop("ax").get_window_extent()
        panel["box"] = (float(bbox.x0), float(height_px - bbox.y1), float(bbox.x1), float(height_px - bbox.y0))
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(str(tmp), format="png", dpi=dpi)
    return {"path": out_png, "plane": plane, "index": index, "size": (width_px, height_px), "panels": panels}


def panel_pixel(layout: dict, panel: int, row: int, col: int) -> tuple[int, int]:
    """PNG pixel (x, y) at the centre of displayed cell (``row``, ``col``) of a panel of :func:`render_overlay`."""
    p = layout["panels"][panel]
    left, top, right, bottom = p["box"]
    rows, cols = p["shape"]
    x = left + (col + 0.5) * (right - left) / cols
    y = top + (row + 0.5) * (bottom - top) / rows
    return int(np.floor(x)), int(np.floor(y))


# --- tables -------------------------------------------------------------------------------------
def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def metrics_rows(summary: Mapping) -> list[tuple[str, str, str, str]]:
    """(name, DSC, NSD, cases) rows: ``organ_dsc/nsd``, ``tumor_dsc/nsd``, then every scored class."""
    rows = [
        (
            "organs (organ_dsc / organ_nsd)",
            _fmt(summary.get("organ_dsc")),
            _fmt(summary.get("organ_nsd")),
            str(summary.get("n_cases", "")),
        ),
        (
            "tumor (tumor_dsc / tumor_nsd)",
            _fmt(summary.get("tumor_dsc")),
            _fmt(summary.get("tumor_nsd")),
            str(summary.get("n_cases", "")),
        ),
    ]
    names = {LABEL_KEYS[i]: i for i in LABEL_KEYS}
    for key, value in summary.get("per_class", {}).items():
        label = names.get(key)
        name = f"{label} {LABELS[label]}" if label is not None else key
        rows.append((name, _fmt(value.get("dsc")), _fmt(value.get("nsd")), str(value.get("n", ""))))
    return rows


def metrics_text(summary: Mapping) -> str:
    """Plain-text metrics table (the quickstart prints it): the four FLARE numbers, then per class."""
    lines = [
        "  ".join(f"{k} {_fmt(summary.get(k))}" for k in ("organ_dsc", "organ_nsd", "tumor_dsc", "tumor_nsd")),
        f"{'class':<26} {'DSC':>7} {'NSD':>7} {'cases':>5}",
    ]
    for name, dsc, nsd, n in metrics_rows(summary)[2:]:
        lines.append(f"{name:<26} {dsc:>7} {nsd:>7} {n:>5}")
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


#: The pipeline's stages in the order they run (columns of its ``timings.csv``).
PIPELINE_STAGES = (
    "roi", "crop", "window_plan", "organ_preprocess", "organ_load_wait", "organ_convert", "organ_network", "organ_aggregate",
    "organ_resample", "tumor_preprocess", "tumor_load_wait", "tumor_convert", "tumor_network", "tumor_aggregate", "tumor_resample", "ensemble",
    "postprocess", "paste", "total_s",
)  # fmt: skip


def median_stage_times(timings_csv: str | os.PathLike) -> dict[str, float]:
    """Median seconds per pipeline stage (columns of the pipeline's ``timings.csv``), stages in running order."""
    import csv

    path = Path(timings_csv)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise Flare23Error(f"{path}: cannot read the timings CSV ({exc.strerror or exc})") from None
    if not rows:
        return {}
    out = {}
    for key in rows[0]:
        if key == "case":
            continue
        values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        if values:
            out[key] = float(np.median(values))
    rank = {k: i for i, k in enumerate(PIPELINE_STAGES)}
    return dict(sorted(out.items(), key=lambda kv: (rank.get(kv[0], len(rank) - 1.5), kv[0])))


def write_report(
    out_md: str | os.PathLike,
    *,
    summary: Mapping,
    stage_times: Mapping[str, float],
    step_times: Mapping[str, float],
    total_seconds: float,
    hardware: Mapping[str, object],
    settings: Mapping[str, object],
    paths: Mapping[str, str | os.PathLike],
    pictures: Sequence[str | os.PathLike] = (),
    notes: Sequence[str] = (),
    title: str = "flare23 quickstart report",
    segment_command: str | None = None,
) -> Path:
    """Write the Markdown report (metrics, timings, hardware, settings, outputs, pictures) atomically.

    ``stage_times``: median seconds per pipeline stage; ``step_times``: wall seconds of each step
    of the run; ``pictures`` are linked relative to the report's folder; ``segment_command``: the
    command that segments a scan of one's own with the trained models (section "Segment your own scan").
    """
    out_md = Path(out_md)
    parts = [f"# {title}", ""]
    parts += [f"Total wall time: **{total_seconds / 60:.1f} min** ({total_seconds:.0f} s).", ""]
    for note in notes:
        parts.append(f"* {note}")
    if notes:
        parts.append("")
    parts += ["## Metrics (FLARE 2023 rules, held-out cases)", ""]
    parts.append(markdown_table(["class", "DSC", "NSD", "cases"], metrics_rows(summary)))
    parts += ["", "## Timing", "", "Steps of this run (wall seconds):", ""]
    parts.append(
        markdown_table(
            ["step", "seconds"], [(k, f"{v:.1f}") for k, v in step_times.items()] + [("total", f"{total_seconds:.1f}")]
        )
    )
    if stage_times:
        parts += ["", "Pipeline, median seconds per case and stage:", ""]
        parts.append(markdown_table(["stage", "median s"], [(k, f"{v:.3f}") for k, v in stage_times.items()]))
    parts += ["", "## Hardware", ""]
    parts.append(markdown_table(["item", "value"], [(k, v) for k, v in hardware.items()]))
    parts += ["", "## Settings", ""]
    parts.append(markdown_table(["setting", "value"], [(k, f"`{v}`") for k, v in settings.items()]))
    parts += ["", "## Outputs", ""]
    parts.append(markdown_table(["output", "path"], [(k, f"`{Path(v)}`") for k, v in paths.items()]))
    if segment_command:
        parts += ["", "## Segment your own scan", "", "With the three models that this run trained:", ""]
        parts += ["```sh", segment_command, "```"]
    if pictures:
        parts += ["", "## Pictures", ""]
        for pic in pictures:
            pic = Path(pic)
            try:
                rel = os.path.relpath(pic, out_md.parent)
            except ValueError:  # another drive on Windows
                rel = str(pic)
            parts += [f"![{pic.stem}]({Path(rel).as_posix()})", ""]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_md, "\n".join(parts).rstrip() + "\n")
    return out_md


__all__ = [
    "CT_WINDOW",
    "DEFAULT_ALPHA",
    "LABEL_COLORS",
    "busiest_slice",
    "ct_to_grey",
    "display_slice",
    "markdown_table",
    "median_stage_times",
    "metrics_rows",
    "metrics_text",
    "overlay_rgb",
    "panel_pixel",
    "pixel_spacing",
    "render_overlay",
    "to_ras",
    "write_report",
]
