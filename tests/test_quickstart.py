"""``flare23 quickstart`` (reduced: tiny phantoms, tiny networks, few iterations) and the report pictures.

The quickstart runs once per module with a copy of the bundles' configs as ``bundles_dir`` and the
working directory in a temporary folder, so that any write outside OUT would be seen. Metrics,
colours and geometry are checked against independent computations (numpy, nibabel, world
coordinates), not against stored numbers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from flare23 import constants as C
from flare23.errors import Flare23Error
from flare23.inference.engine import CACHE_FOLDER

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


# --- the reduced quickstart ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import flare23.tools.quickstart as qs
    from flare23.tools.quickstart import quickstart_cli
    from flare23.tools.quickstart_steps import train_bundle

    trained_on = {}  # bundle -> (dataset_dir, datalist) that the quickstart gave its training

    def recording_train_bundle(bundle_dir, dataset_dir, datalist, *args, **kwargs):
        trained_on[Path(bundle_dir).name] = (Path(dataset_dir), Path(datalist))
        return train_bundle(bundle_dir, dataset_dir, datalist, *args, **kwargs)


    work = tmp_path_factory.mktemp("quickstart")
    bundles = work / "bundles"
    shutil.copytree(ROOT / "bundles", bundles, ignore=shutil.ignore_patterns("models", "runs", "eval", "*.pt", "*.ts"))
    before = _listing(bundles)
    cwd = work / "cwd"
    cwd.mkdir()
    out = cwd / "qs"
    old_cwd = Path.cwd()
    buf = io.StringIO()  # capsys is function-scoped: capture the module-scoped run's stdout by hand
    threads = torch.get_num_threads()
    t0 = time.monotonic()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(buf), pytest.MonkeyPatch.context() as mp:
            mp.setattr(qs, "train_bundle", recording_train_bundle)
            quickstart_cli(
                out=str(out),
                size="tiny",
                cases=6,
                test_cases=2,
                epochs=2,
                epoch_length=1,
                threads=1,
                minutes_budget=0,
                bundles_dir=str(bundles),
            )
    finally:
        os.chdir(old_cwd)
    assert torch.get_num_threads() == threads  # restored
    return {
        "out": out,
        "cwd": cwd,
        "stdout": buf.getvalue(),
        "bundles": bundles,
        "before": before,
        "seconds": time.monotonic() - t0,
        "record": json.loads((out / "quickstart.json").read_text()),
        "trained_on": trained_on,
    }


def test_prints_metrics_table_matching_the_evaluation_summary(run):
    summary = json.loads((run["out"] / "evaluation" / "summary.json").read_text())
    assert {"organ_dsc", "organ_nsd", "tumor_dsc", "tumor_nsd", "per_class", "n_cases"} <= set(summary)
    assert summary["n_cases"] == 2 and summary["missing"] == []
    assert set(summary["per_class"]) == {C.LABEL_KEYS[c] for c in C.FOREGROUND_IDS}
    text = run["stdout"]
    for key in ("organ_dsc", "organ_nsd", "tumor_dsc", "tumor_nsd"):
        m = re.search(rf"{key} ([0-9.]+|-)", text)
        assert m, key
        assert m.group(1) == ("-" if summary[key] is None else f"{summary[key]:.4f}")
    for c in C.FOREGROUND_IDS:  # one printed row per class with its DSC and NSD
        v = summary["per_class"][C.LABEL_KEYS[c]]
        assert re.search(rf"^{c} {re.escape(C.LABELS[c])}\s+{v['dsc']:.4f}\s+{v['nsd']:.4f}\s+2$", text, re.M), C.LABELS[c]
    # organ means are the mean of the 13 organ class means (independent of flare23.evaluation.metrics.aggregate)
    assert summary["organ_dsc"] == pytest.approx(np.mean([summary["per_class"][C.LABEL_KEYS[c]]["dsc"] for c in C.ORGAN_IDS]))


def test_evaluation_scores_the_predictions_against_the_held_out_full_labels(run):
    out = run["out"]
    rows = list(csv.DictReader(open(out / "evaluation" / "per_case.csv")))
    assert len(rows) == 2
    for row in rows:
        case = row["case"]
        img = nib.load(out / "data" / "heldout" / "imagesTr" / f"{case}_0000.nii.gz")
        pred_img = nib.load(out / "predictions" / f"{case}.nii.gz")
        assert pred_img.shape == img.shape and np.allclose(pred_img.affine, img.affine, atol=1e-5)
        pred = np.asarray(pred_img.dataobj)
        ref = np.asarray(nib.load(out / "data" / "heldout" / "labelsTr" / f"{case}.nii.gz").dataobj)
        for c in (1, 11, C.TUMOR_ID):  # plain DSC where the FLARE rules do not restrict the masks
            g, p = ref == c, pred == c
            expected = 1.0 if not g.any() and not p.any() else 2.0 * np.count_nonzero(g & p) / (g.sum() + p.sum())
            assert float(row[f"{C.LABEL_KEYS[c]}_dsc"]) == pytest.approx(expected, abs=1e-9)


def test_training_used_the_merged_labels_of_the_data_tools(run):
    data = run["out"] / "data"
    roi = json.loads((data / "roi_datalist.json").read_text())
    assert roi["training"] and roi["validation"]
    for item in roi["training"] + roi["validation"]:
        assert (data / item["label"]).resolve().parent == (data / "merged_labels").resolve()
    kept = {"organ": set(), "tumor": set()}  # METHOD.md section 2, computed here: tumor box inside the organ box (or no tumor)
    for path in sorted((data / "merged_labels").glob("*.nii.gz")):
        partial = np.asarray(nib.load(data / "phantoms" / "partial" / path.name).dataobj)
        pseudo = np.asarray(nib.load(data / "phantoms" / "pseudo" / path.name).dataobj)
        merged = np.asarray(nib.load(path).dataobj)
        rule = np.where(partial > 0, partial, np.where(pseudo == C.TUMOR_ID, 0, pseudo))  # METHOD.md section 2
        assert np.array_equal(merged, rule), path.name
        tumor, organs = np.argwhere(merged == C.TUMOR_ID), np.argwhere(np.isin(merged, C.ORGAN_IDS))
        inside = tumor.size == 0 or bool(np.all(tumor.min(0) >= organs.min(0)) and np.all(tumor.max(0) <= organs.max(0)))
        kept["organ"].add(path.name)
        if inside:
            kept["tumor"].add(path.name)
    assert len(kept["organ"]) == 6
    for model, bundle in (("organ", "organ_seg"), ("tumor", "tumor_seg")):
        crops = data / f"flare23_{model}"  # each fine model trained on its own folder
        assert run["trained_on"][bundle] == (crops, crops / "datalist.json")
        listed = json.loads((crops / "datalist.json").read_text())
        assert listed["training"] and listed["validation"]
        items = listed["training"] + listed["validation"]
        assert {Path(i["label"]).name for i in items} == kept[model] == {p.name for p in (crops / "labelsTr").glob("*.nii.gz")}
        for item in items:
            assert (crops / item["label"]).resolve().parent == (crops / "labelsTr").resolve()
            cropped = np.asarray(nib.load(crops / item["label"]).dataobj)
            merged = np.asarray(nib.load(data / "merged_labels" / Path(item["label"]).name).dataobj)
            assert np.array_equal(np.bincount(cropped.ravel(), minlength=15)[1:], np.bincount(merged.ravel(), minlength=15)[1:])
        fp = json.loads((crops / "fingerprint.json").read_text())
        assert fp["clip_low"] < fp["mean"] < fp["clip_high"] and fp["n_cases"] == len(kept[model])
    assert run["trained_on"]["roi_extractor"] == (data, data / "roi_datalist.json")


def test_checkpoints_are_weights_only_state_dicts_of_the_trained_networks(run):
    from flare23.bundles import SubBundle
    from flare23.tools.quickstart import PRESETS
    from flare23.training.checkpoints import load_weights

    for bundle in ("roi_extractor", "organ_seg", "tumor_seg"):
        ckpt = run["out"] / "checkpoints" / bundle
        # beside them at most the pipeline's OpenVINO conversions (engine auto on a CPU), in their cache folder
        assert sorted(p.name for p in ckpt.iterdir() if p.name != CACHE_FOLDER) == ["checkpoint_epoch=2.pt", "model.pt"]
        cached = sorted(p.suffix for p in (ckpt / CACHE_FOLDER).iterdir()) if (ckpt / CACHE_FOLDER).is_dir() else []
        assert cached in ([], [".bin", ".bin", ".json", ".json", ".xml", ".xml"]), cached
        state = torch.load(ckpt / "model.pt", weights_only=True, map_location="cpu")
        assert set(state) == {"model", "settings"} and all(isinstance(v, torch.Tensor) for v in state["model"].values())
        full = torch.load(ckpt / "checkpoint_epoch=2.pt", weights_only=True, map_location="cpu")
        assert full["trainer"]["iteration"] == 2 and full["trainer"]["epoch_length"] == 1
        # the quickstart's trainings record their settings: the bundle builds the trained network from model.pt alone
        net = SubBundle(run["bundles"] / bundle, "inference.json", {"ckpt_path": str(ckpt / "model.pt")}).network()
        load_weights(net, ckpt / "model.pt")  # strict: every key and shape matches
        preset = PRESETS["tiny"][bundle]["network"]
        assert list(net.filters) == preset["network_def#filters"]
        for key in ("target_spacing", "patch_size"):
            if key in preset:
                assert state["settings"]["values"][key] == preset[key]
        assert run["record"]["training"][bundle]["iterations"] == 2 and run["record"]["training"][bundle]["stopped_at"] is None


def test_report_pictures_and_paths(run):
    from flare23.io import load_nifti
    from flare23.tools.report import busiest_slice, panel_pixel, render_overlay, to_ras

    out, text = run["out"], run["stdout"]
    report = out / "report" / "report.md"
    md = report.read_text()
    summary = run["record"]["summary"]
    assert f"| {summary['organ_dsc']:.4f} |" in md and "Total wall time" in md and "## Hardware" in md
    assert str(report) in text  # absolute paths printed
    case = sorted(p.name for p in (out / "data" / "heldout" / "labelsTr").iterdir())[0].replace(".nii.gz", "")
    image, affine, _ = load_nifti(out / "data" / "heldout" / "imagesTr" / f"{case}_0000.nii.gz")
    ref = load_nifti(out / "data" / "heldout" / "labelsTr" / f"{case}.nii.gz")[0]
    pred = load_nifti(out / "predictions" / f"{case}.nii.gz")[0]
    for plane in ("axial", "coronal"):
        png = out / "report" / f"{case}_{plane}.png"
        assert png.is_absolute() and f"{png}" in text and f"report/{png.name}" in md
        pixels = _png(png)
        assert pixels.shape[0] >= 200 and pixels.shape[1] >= 400
        # the same call again gives the same picture and its layout
        title = f"{case}: reference labels (left) and the pipeline's prediction (right)"
        layout = render_overlay(image, pred, affine, run["cwd"].parent / f"again_{plane}.png", plane, reference=ref, title=title)
        assert np.array_equal(_png(layout["path"]), pixels)
        ref_ras = to_ras(ref, affine)[0]
        assert layout["index"] == busiest_slice(ref_ras, plane)
        k = layout["index"]
        shown = ref_ras[::-1, ::-1, k].T if plane == "axial" else ref_ras[::-1, k, ::-1].T
        labelled = np.argwhere(shown > 0)
        assert len(labelled) > 0
        for r, c in labelled[:: max(1, len(labelled) // 50)]:  # labelled cells are coloured ...
            x, y = panel_pixel(layout, 0, r, c)
            red, green, blue = (int(v) for v in pixels[y, x])
            assert not (red == green == blue), (plane, r, c)
        for r, c in np.argwhere(shown == 0)[::97]:  # ... the others are grey
            x, y = panel_pixel(layout, 0, r, c)
            assert len(set(pixels[y, x].tolist())) == 1, (plane, r, c)


def test_prints_the_command_that_segments_a_scan_with_the_trained_models(run):
    command = run["record"]["segment_command"]
    assert [ln for ln in run["stdout"].splitlines() if ln.strip()][-1] == command  # the last line printed
    assert "## Segment your own scan" in (md := (run["out"] / "report" / "report.md").read_text())
    assert f"```sh\n{command}\n```" in md
    args = shlex.split(command)
    assert Path(args[0]).name == "flare23" and (not Path(args[0]).is_absolute() or Path(args[0]).is_file())
    assert args[1:6] == ["segment", "-i", "YOUR_SCAN.nii.gz", "-o", "YOUR_SCAN_seg.nii.gz"]
    options = dict(zip(args[6::2], args[7::2], strict=True))  # only the three checkpoints: they carry their settings
    bundles = {"roi": "roi_extractor", "organ": "organ_seg", "tumor": "tumor_seg"}
    assert options == {f"--{k}_ckpt": str(run["out"] / "checkpoints" / b / "model.pt") for k, b in bundles.items()}
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in options.values())
    pipeline = json.loads((run["bundles"] / "pipeline" / "configs" / "inference.json").read_text())
    assert {option[2:] for option in options} <= set(pipeline)  # ids of the pipeline that `flare23 segment` overrides


def test_the_printed_command_segments_a_scan_as_the_quickstart_did(run, tmp_path):
    """The newcomer's next step: the printed command on a held-out scan gives the quickstart's own labels."""
    from flare23.io import load_nifti

    prediction = sorted((run["out"] / "predictions").glob("*.nii.gz"))[0]
    case = prediction.name[: -len(".nii.gz")]
    scan = next((run["out"] / "data").rglob(f"{case}_0000.nii.gz"))
    args = shlex.split(run["record"]["segment_command"])
    args[args.index("YOUR_SCAN.nii.gz")] = str(scan)
    args[args.index("YOUR_SCAN_seg.nii.gz")] = str(tmp_path / "seg.nii.gz")
    # the same threads as the quickstart's own pipeline run (its default): OpenVINO's results depend on the thread count
    # (bf16 logits by up to 0.16 on a tiny random network, 1 against 2 threads), PyTorch's did not
    cache = run["out"] / "checkpoints" / "organ_seg" / CACHE_FOLDER
    def listing_of():
        return sorted((p.name, p.stat().st_mtime_ns) for p in cache.iterdir()) if cache.is_dir() else []

    listing = listing_of()
    proc = subprocess.run([sys.executable, "-m", "flare23", *args[1:]], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the quickstart's conversions serve the command (it builds the recorded network class, the quickstart the class
    # its overrides name: one conversion for both, not a second one)
    assert len(listing) == (0 if torch.cuda.is_available() else 6) and listing_of() == listing  # CUDA: PyTorch, no cache
    ours, theirs = load_nifti(tmp_path / "seg.nii.gz"), load_nifti(prediction)
    assert np.array_equal(ours[0], theirs[0]) and np.allclose(ours[1], theirs[1])
    assert len(np.unique(ours[0])) > 1


def test_help_states_the_presets_defaults():
    from fire.helptext import HelpText

    from flare23.tools.quickstart import PRESETS, quickstart_cli

    text = " ".join(HelpText(quickstart_cli).split())
    assert "Default: '~/flare23_quickstart'" in text
    for key in ("cases", "test_cases"):
        stated = re.search(rf"--{key}={key.upper()} .*?\(default ([^)]*)\)", text).group(1)
        assert {s: int(n) for n, s in re.findall(r"(\d+) for size (\w+)", stated)} == {s: p[key] for s, p in PRESETS.items()}


def test_default_output_folder_is_in_the_home_folder(tmp_path, monkeypatch):
    import inspect

    from flare23.tools.quickstart import quickstart, quickstart_cli
    from flare23.tools.quickstart_output import DEFAULT_OUT, _prepare_out

    assert all(inspect.signature(f).parameters["out"].default == DEFAULT_OUT for f in (quickstart, quickstart_cli))
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))
    monkeypatch.chdir(cwd)
    assert _prepare_out(DEFAULT_OUT, overwrite=False) == home / "flare23_quickstart"
    assert (home / "flare23_quickstart").is_dir() and not any(cwd.iterdir())


def test_nothing_written_outside_out(run):
    assert _listing(run["bundles"]) == run["before"]  # the bundles it used are untouched
    assert sorted(p.name for p in run["cwd"].iterdir()) == ["qs"]  # nothing in the working directory
    hidden = [p for p in run["out"].rglob("*") if p.name.startswith(".") and p.name not in (".flare23_quickstart", CACHE_FOLDER)]
    assert not hidden  # no temporaries (the OpenVINO cache beside the checkpoints is kept on purpose)


def test_refuses_foreign_or_earlier_output_folders(run, tmp_path):
    from flare23.tools.quickstart import quickstart_cli

    with pytest.raises(Flare23Error, match="earlier quickstart.*--overwrite") as err:
        quickstart_cli(out=str(run["out"]), size="tiny", bundles_dir=str(run["bundles"]))
    assert str(run["out"]) in str(err.value) and "\n" not in str(err.value)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(Flare23Error, match="not empty") as err:
        quickstart_cli(out=str(foreign), size="tiny", bundles_dir=str(run["bundles"]))
    assert str(foreign) in str(err.value)
    assert (foreign / "thesis.tex").read_text() == "keep me" and sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    with pytest.raises(Flare23Error, match="size 'huge'"):
        quickstart_cli(out=str(tmp_path / "new"), size="huge", bundles_dir=str(run["bundles"]))
    with pytest.raises(Flare23Error, match="cases 1"):
        quickstart_cli(out=str(tmp_path / "new"), cases=1, bundles_dir=str(run["bundles"]))
    assert not (tmp_path / "new").exists()


# --- the time guard ---------------------------------------------------------------------------------------------------


class _Counter:
    def __init__(self):
        self.runs = []

    def run(self, epoch):
        self.runs.append(epoch)


@pytest.mark.parametrize("deadline_s, epochs, validations", [(None, 3, []), (-1.0, 1, [1])])
def test_training_guard_stops_at_an_epoch_end_and_validates_once(deadline_s, epochs, validations):
    from ignite.engine import Engine

    from flare23.tools.quickstart_steps import _TrainingGuard

    engine = Engine(lambda e, b: {"loss": 0.5})
    validator = _Counter()
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    guard = _TrainingGuard("test", validator, val_interval=3, deadline=deadline, total=6)
    guard.attach(engine)
    engine.run(range(2), max_epochs=3)
    guard.close()
    assert engine.state.epoch == epochs and engine.state.iteration == 2 * epochs
    assert validator.runs == validations
    assert guard.stopped_at == (None if deadline_s is None else 1)


# --- pictures ---------------------------------------------------------------------------------------------------------


def _lps_volume():
    """A 40 x 30 x 20 LPS volume (2 x 1.5 x 3 mm), HU 40; liver on the patient's right, spleen on the left, aorta anterior."""
    shape = (40, 30, 20)
    affine = np.diag([-2.0, -1.5, 3.0, 1.0])
    affine[:3, 3] = [40.0, 20.0, -30.0]
    image = np.full(shape, 40, dtype=np.int16)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[0:12, 8:22, 6:14] = 1  # LPS: small i = large world x = patient's right
    labels[28:40, 8:22, 6:14] = 3  # patient's left
    labels[18:22, 0:5, 6:14] = 5  # LPS: small j = large world y = anterior
    image[:, :, :2] = -1000  # air in the lowest slices (feet)
    return image, labels, affine


def test_render_overlay_colours_orientation_and_aspect(tmp_path):
    from flare23.tools.report import CT_WINDOW, DEFAULT_ALPHA, LABEL_COLORS, panel_pixel, render_overlay

    image, labels, affine = _lps_volume()
    layout = render_overlay(image, labels, affine, tmp_path / "axial.png", "axial", index=10)
    pixels = _png(tmp_path / "axial.png")
    assert (pixels.shape[1], pixels.shape[0]) == layout["size"]
    rows, cols = layout["panels"][0]["shape"]
    assert (rows, cols) == (30, 40)  # axial picture: y rows, x columns
    left, top, right, bottom = layout["panels"][0]["box"]
    assert (right - left) / (bottom - top) == pytest.approx((40 * 2.0) / (30 * 1.5), rel=0.02)  # physical aspect

    # independent geometry: world coordinates of a voxel -> fraction of the picture (right of patient on the left, anterior on top)
    corners = np.array([[i, j, 0, 1] for i in (0, 39) for j in (0, 29)], float) @ affine.T
    x_max, x_min = corners[:, 0].max() + 1.0, corners[:, 0].min() - 1.0  # outer voxel edges (half voxel = 1 mm in x)
    y_max, y_min = corners[:, 1].max() + 0.75, corners[:, 1].min() - 0.75
    grey = (40.0 - CT_WINDOW[0]) / (CT_WINDOW[1] - CT_WINDOW[0])
    for voxel, label in (((5, 15, 10), 1), ((34, 15, 10), 3), ((20, 2, 10), 5), ((20, 15, 10), 0)):
        x, y, _ = affine[:3, :3] @ np.array(voxel, float) + affine[:3, 3]
        px = int(left + (x_max - x) / (x_max - x_min) * (right - left))
        py = int(top + (y_max - y) / (y_max - y_min) * (bottom - top))
        colour = np.asarray(LABEL_COLORS[label], float) / 255.0 if label else np.full(3, grey)
        alpha = DEFAULT_ALPHA if label else 0.0
        expected = np.rint(255.0 * ((1.0 - alpha) * grey + alpha * colour))
        assert np.abs(pixels[py, px].astype(float) - expected).max() <= 1.0, (voxel, label, pixels[py, px], expected)
    assert panel_pixel(layout, 0, 0, 0)[0] < panel_pixel(layout, 0, 0, cols - 1)[0]

    # coronal (fixed y): superior on top; the air slices (feet) at the bottom of the picture
    layout = render_overlay(image, labels, affine, tmp_path / "coronal.png", "coronal", index=15)
    pixels = _png(tmp_path / "coronal.png")
    assert layout["panels"][0]["shape"] == (20, 40)
    x, y = panel_pixel(layout, 0, 19, 20)
    assert pixels[y, x].tolist() == [0, 0, 0]  # -1000 HU, below the window
    x, y = panel_pixel(layout, 0, 0, 20)
    assert len(set(pixels[y, x].tolist())) == 1 and pixels[y, x][0] > 100


def test_render_overlay_legend_names_present_labels_and_rejects_bad_input(tmp_path):
    from flare23.tools.report import busiest_slice, overlay_rgb, render_overlay

    image, labels, affine = _lps_volume()
    layout = render_overlay(image, labels, affine, tmp_path / "a.png", "axial")
    assert layout["index"] == busiest_slice(labels, "axial")  # LPS and RAS share the z axis here
    ras_rgb = overlay_rgb(image[:, :, 10].astype(float), labels[:, :, 10])
    assert ras_rgb.dtype == np.uint8 and ras_rgb.shape == (40, 30, 3)
    with pytest.raises(Flare23Error, match="bad.png"):
        render_overlay(image, labels[:-1], affine, tmp_path / "bad.png", "axial")
    with pytest.raises(Flare23Error, match="plane 'sagittal'"):
        render_overlay(image, labels, affine, tmp_path / "bad.png", "sagittal")
    with pytest.raises(Flare23Error, match="outside"):
        render_overlay(image, labels, affine, tmp_path / "bad.png", "axial", index=20)
    assert not (tmp_path / "bad.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_median_stage_times(tmp_path):
    from flare23.tools.report import median_stage_times

    rng = np.random.default_rng(0)
    values = {k: rng.uniform(0, 5, size=5).round(4) for k in ("roi", "organ_network", "total_s")}
    lines = ["case,organ_network,roi,total_s"] + [
        f"c{i},{values['organ_network'][i]},{values['roi'][i]},{values['total_s'][i]}" for i in range(5)
    ]
    (tmp_path / "timings.csv").write_text("\n".join(lines) + "\n")
    med = median_stage_times(tmp_path / "timings.csv")
    assert list(med) == ["roi", "organ_network", "total_s"]  # running order, not the CSV's alphabetical order
    assert med == {k: pytest.approx(statistics.median(values[k].tolist())) for k in ("organ_network", "roi", "total_s")}


@pytest.mark.parametrize("cpus, load", [(2, 5.0), (2, 0.1), (8, 3.2), (4, 9.0)])
def test_default_threads_leave_busy_cores_alone(monkeypatch, cpus, load):
    from flare23.tools.quickstart_plan import default_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's cores do not count ...
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)  # ... the process's do
    monkeypatch.setattr("flare23.efficiency.cgroup_cpu_limit", lambda *a, **k: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    idle = max(1, math.floor(cpus - load + 0.5))  # cores left idle, rounded half up
    assert default_threads(cpus) == min(cpus, idle)
    assert default_threads(1) == 1
