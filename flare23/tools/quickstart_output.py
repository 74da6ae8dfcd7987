"""The quickstart's output folder, pictures, printed results and the segment command it prints."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from flare23.constants import IMAGE_SUFFIX
from flare23.errors import Flare23Error
from flare23.tools.quickstart_steps import _say

# --- output and logging -------------------------------------------------------------------------
MARKER = ".flare23_quickstart"
DEFAULT_OUT = "~/flare23_quickstart"
SUBFOLDERS = ("data", "checkpoints", "runs", "predictions", "evaluation", "report", "logs")


def _prepare_out(out, overwrite: bool) -> Path:
    """Create OUT; an earlier quickstart's folders are replaced only with ``overwrite``; foreign content is refused."""
    import shutil

    from flare23.io import ensure_output_dir

    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise Flare23Error(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise Flare23Error(
                f"{out}: folder is not empty and was not written by flare23 quickstart; choose a new or empty folder"
            )
        if not overwrite:
            raise Flare23Error(
                f"{out}: holds an earlier quickstart run; pass --overwrite to replace it, or choose another folder"
            )
        for name in SUBFOLDERS + ("quickstart.json",):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    ensure_output_dir(out)
    (out / MARKER).write_text("written by flare23 quickstart\n", encoding="utf-8")
    return out


def _cases_with_tumor(labels_dir: Path) -> int:
    from flare23.constants import TUMOR_ID
    from flare23.io import list_nifti, load_nifti

    return sum(bool(np.any(load_nifti(p)[0] == TUMOR_ID)) for p in list_nifti(labels_dir))


def _any_label(path: Path) -> bool:
    from flare23.io import load_nifti

    return bool(np.any(load_nifti(path)[0]))


def _pictures(paths: dict, report_dir: Path) -> list[Path]:
    """Axial and coronal pictures of the first held-out case: reference labels beside the prediction."""
    from flare23.io import list_nifti, load_nifti
    from flare23.tools.report import render_overlay

    images = list_nifti(paths["held-out phantoms"] / "imagesTr")
    report_dir.mkdir(parents=True, exist_ok=True)
    image_path = images[0]
    case = image_path.name[: -len(f"{IMAGE_SUFFIX}.nii.gz")]
    image, affine, _ = load_nifti(image_path)
    reference, _, _ = load_nifti(paths["held-out phantoms"] / "labelsTr" / f"{case}.nii.gz")
    pred_path = paths["predictions"] / f"{case}.nii.gz"
    prediction = load_nifti(pred_path)[0] if pred_path.is_file() else np.zeros_like(reference)
    written = []
    for plane in ("axial", "coronal"):
        png = report_dir / f"{case}_{plane}.png"
        render_overlay(
            image, prediction, affine, png, plane, reference=reference,
            title=f"{case}: reference labels (left) and the pipeline's prediction (right)",
        )  # fmt: skip
        written.append(png)
    return written


def segment_command(models: dict) -> str:
    """The ``flare23 segment`` command line that segments ``YOUR_SCAN.nii.gz`` with the checkpoints ``models`` (per bundle).

    Only the three checkpoints: a trained checkpoint carries its own settings. The ``flare23``
    executable is the one of this Python environment where it exists.
    """
    import shlex

    exe = Path(sys.executable).with_name("flare23")
    args = [str(exe) if exe.is_file() else "flare23", "segment", "-i", "YOUR_SCAN.nii.gz", "-o", "YOUR_SCAN_seg.nii.gz"]
    for option, bundle in (("--roi_ckpt", "roi_extractor"), ("--organ_ckpt", "organ_seg"), ("--tumor_ckpt", "tumor_seg")):
        args += [option, str(Path(models[bundle]).absolute())]
    return shlex.join(args)


def _print_results(record: dict, minutes_budget) -> None:
    from flare23.tools.report import metrics_text

    summary = record["summary"]
    _say("")
    _say(f"== metrics: FLARE 2023 rules on {summary.get('n_cases')} held-out phantom case(s) ==")
    _say(metrics_text(summary))
    _say("")
    _say("== timing ==")
    _say("  ".join(f"{k} {v:.0f}s" for k, v in record["step_times"].items()))
    if record["stage_times"]:
        _say(
            "pipeline, median seconds per case and stage: " + ", ".join(f"{k} {v:.2f}" for k, v in record["stage_times"].items())
        )
    budget = f" (budget {minutes_budget:g} min)" if minutes_budget else ""
    _say(f"total: {record['total_seconds'] / 60:.1f} min{budget}")
    for note in record["notes"]:
        _say(f"note: {note}")
    _say(
        "note: for speed, the quickstart trains differently from the method (Adam, batch 1, no augmentation, small networks): see the report"
    )
    _say("")
    _say("== outputs ==")
    for key, value in record["paths"].items():
        _say(f"{key + ':':<28} {value}")
    for pic in record["pictures"]:
        _say(f"{'picture:':<28} {pic}")
    _say("")
    _say("== segment your own scan with the trained models ==")
    _say(record["segment_command"])
