"""Window skipping (issue 23 item 3): windows and network time saved, and what it does to the labels.

Two measurements::

    python bench/bench_skip.py trained --qs /tmp/qs --out /tmp/bench_skip [--margins 10,20] [--threads 1]
    python bench/bench_skip.py counts --seeds 3,4,5 --slices 100 [--margins 10,20] [--nifti CT:LABELS ...]

``trained``: the pipeline bundle (:func:`flare23.inference.segment.run_pipeline`, what ``flare23 segment``
runs) with the three checkpoints that a quickstart trained (read from ``QS/quickstart.json``'s
``segment_command``, or ``--roi_ckpt/--organ_ckpt/--tumor_ckpt``) on its held-out phantoms
(``QS/data/heldout``), once per configuration: off, ``skip_air_windows``, ``tumor_windows=hosts`` at each
margin, and both (``--configs`` picks some). ``--roi whole`` replaces the ROI crop by the whole scan (not what
the product does; it gives the rules windows to skip with trained weights). Per configuration: windows run / skipped per branch (the inferer's ``window_counts``),
network seconds per branch (``<branch>_network`` of ``timings.csv``, summed over the cases) and the
planning overhead (``window_plan``), organ and tumor DSC (:func:`flare23.evaluation.evaluate.evaluate_folders`,
what ``flare23 evaluate`` computes) and the fraction of voxels whose label differs from the run without
skipping (all voxels, and voxels that are foreground in either run). Then, per held-out case, the
windows that the *paper's* patch sizes and spacings would run (:func:`paper_counts`): the body from the
image's HU, the hosts from the labels of the run without skipping, on that run's ROI crop.

``counts``: full-size phantoms (``make_phantom(size="full")``) and any scans given with their labels
(``--nifti``), the crop of the box of their own labels with the method's margins, the paper's patch sizes, spacings and overlaps: windows per
branch, run under each rule. No network runs: which windows a rule skips depends on the image's HU
(air rule) and on organ labels (host rule: the phantom's reference labels stand for the organ
model's), not on the networks' widths or weights, and every window of a branch costs the same time,
so the fraction of windows skipped is the fraction of that branch's network time saved.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --- the windows of the paper's settings ----------------------------------------------------------
def paper_branches():
    from flare23 import constants as c

    return {
        "organ": (c.ORGAN_SPACING_XYZ, c.ORGAN_PATCH_XYZ, c.ORGAN_OVERLAP),
        "tumor": (c.TUMOR_SPACING_XYZ, c.TUMOR_PATCH_XYZ, c.TUMOR_OVERLAP),
    }


def paper_counts(crop_hu_ras, spacing_ras, labels_ras=None, margins=(10.0, 20.0)) -> dict:
    """Windows of each branch at the paper's settings on one crop: total, and run by each rule.

    ``crop_hu_ras``: the crop in HU, RAS order; ``labels_ras``: organ labels on the same grid (host rule).
    """
    import torch

    from flare23.data.spacing import target_shape
    from flare23.inference.skipping import body_mask, combine, host_mask, margin_voxels, window_plan

    hu = torch.as_tensor(np.ascontiguousarray(crop_hu_ras))
    body = body_mask(hu)
    hosts = host_mask(torch.as_tensor(np.ascontiguousarray(labels_ras))) if labels_ras is not None else None
    out = {"crop_shape": list(hu.shape), "body_fraction": float(body.float().mean())}
    for name, (spacing, patch, overlap) in paper_branches().items():
        model = target_shape(tuple(hu.shape), spacing_ras, spacing)
        air = window_plan(body, model, patch, overlap)
        row = {"model_shape": list(model), "windows": len(air), "air_run": sum(air.values())}
        if name == "tumor" and hosts is not None:
            for m in margins:
                plan = window_plan(hosts, model, patch, overlap, grow=margin_voxels(m, spacing_ras))
                row[f"hosts{m:g}_run"] = sum(plan.values())
                row[f"air_hosts{m:g}_run"] = sum(combine(air, plan).values())
        out[name] = row
    return out


def _crop_ras(array, affine, box):
    import torch

    from flare23.inference.cascade import crop_to_box

    _, _, _, crop_ras, spacing = crop_to_box(torch.as_tensor(np.ascontiguousarray(array)), np.asarray(affine, float), box)
    return crop_ras.numpy(), spacing


def _summarise_counts(rows: list[dict], margins) -> list[str]:
    lines = ["| case | crop (RAS) | body | organ windows | organ run, air rule | tumor windows | tumor run, air rule | "
             + " | ".join(f"tumor run, hosts {m:g} mm | tumor run, air + hosts {m:g} mm" for m in margins) + " |"]  # fmt: skip
    lines.append("|" + "---|" * (7 + 2 * len(margins)))
    tot = {}
    for r in rows:
        o, t = r["organ"], r["tumor"]
        cells = [r["case"], "x".join(map(str, r["crop_shape"])), f"{r['body_fraction']:.0%}", o["windows"], o["air_run"],
                 t["windows"], t["air_run"]]  # fmt: skip
        for m in margins:
            cells += [t.get(f"hosts{m:g}_run", "-"), t.get(f"air_hosts{m:g}_run", "-")]
        for k, v in [("ow", o["windows"]), ("oa", o["air_run"]), ("tw", t["windows"]), ("ta", t["air_run"])] + [
            (f"h{m:g}", t.get(f"hosts{m:g}_run", 0)) for m in margins
        ] + [(f"ah{m:g}", t.get(f"air_hosts{m:g}_run", 0)) for m in margins]:
            tot[k] = tot.get(k, 0) + v
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if rows:
        saved = [f"organ, air rule: {1 - tot['oa'] / tot['ow']:.1%}", f"tumor, air rule: {1 - tot['ta'] / tot['tw']:.1%}"]
        for m in margins:
            if any(f"hosts{m:g}_run" in r["tumor"] for r in rows):
                saved += [f"tumor, hosts {m:g} mm: {1 - tot[f'h{m:g}'] / tot['tw']:.1%}",
                          f"tumor, air + hosts {m:g} mm: {1 - tot[f'ah{m:g}'] / tot['tw']:.1%}"]  # fmt: skip
        lines.append("")
        lines.append("windows skipped over all cases (= share of that branch's network time): " + "; ".join(saved))
    return lines


def cmd_counts(args) -> None:
    from flare23.roi.box import roi_box
    from flare23.tools.phantoms.generate import make_phantom

    margins = [float(v) for v in args.margins.split(",")]
    rows = []
    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        t0 = time.perf_counter()
        case = make_phantom(seed, size="full", slices=args.slices, orientation="RAS")
        organs = (case["label"] > 0) & (case["label"] < 14)
        box = roi_box(organs, (1, 1, 1), organs.shape, case["affine"])
        hu, spacing = _crop_ras(case["image"], case["affine"], box)
        labels, _ = _crop_ras(case["label"], case["affine"], box)
        row = {"case": f"full seed {seed}, {case['image'].shape[0]}x{case['image'].shape[1]}x{case['image'].shape[2]}",
               **paper_counts(hu, spacing, labels, margins)}  # fmt: skip
        print(json.dumps(row), f"({time.perf_counter() - t0:.1f} s)", flush=True)
        rows.append(row)
    for pair in args.nifti:
        import nibabel as nib

        image_path, label_path = pair.split(":")
        img, lab = nib.load(image_path), nib.load(label_path)
        label = np.asarray(lab.dataobj)
        organs = (label > 0) & (label < 14)
        box = roi_box(organs, (1, 1, 1), organs.shape, img.affine)
        hu, spacing = _crop_ras(np.asarray(img.dataobj), img.affine, box)
        labels, _ = _crop_ras(label, img.affine, box)
        row = {"case": f"{Path(image_path).name} {'x'.join(map(str, img.shape))}", **paper_counts(hu, spacing, labels, margins)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n".join(_summarise_counts(rows, margins)))


# --- trained models on held-out phantoms ----------------------------------------------------------
def _checkpoints(args) -> dict:
    given = {k: getattr(args, f"{k}_ckpt") for k in ("roi", "organ", "tumor")}
    if all(given.values()):
        return given
    record = json.loads((Path(args.qs) / "quickstart.json").read_text())
    words = shlex.split(record["segment_command"])
    found = {k: words[words.index(f"--{k}_ckpt") + 1] for k in ("roi", "organ", "tumor")}
    return {k: given[k] or found[k] for k in found}


def _configs(margins) -> list[tuple[str, dict]]:
    out = [("off", {}), ("air", {"skip_air_windows": True})]
    out += [(f"hosts {m:g} mm", {"tumor_windows": "hosts", "tumor_host_margin_mm": m}) for m in margins]
    m = margins[-1]
    out.append((f"air + hosts {m:g} mm", {"skip_air_windows": True, "tumor_windows": "hosts", "tumor_host_margin_mm": m}))
    return out


def _run(images: Path, out: Path, ckpts: dict, threads: int, options: dict) -> dict:
    import csv

    from flare23.inference.segment import run_pipeline

    t0 = time.perf_counter()
    workflow = run_pipeline(images, out, roi_ckpt=ckpts["roi"], organ_ckpt=ckpts["organ"], tumor_ckpt=ckpts["tumor"],
                            threads=threads, **options)  # fmt: skip
    wall = time.perf_counter() - t0
    inferer = workflow.parser.ref_resolver.resolved_content["inferer"]
    with open(out / "timings.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    seconds = {k: sum(float(r.get(k) or 0.0) for r in rows) for k in ("organ_network", "tumor_network", "window_plan", "total_s")}
    counts = {}
    for record in inferer.window_counts:
        for k, v in record.items():
            counts[k] = counts.get(k, 0) + int(v)
    return {"seconds": seconds, "windows": counts, "per_case_windows": inferer.window_counts, "wall_s": wall}


def _differ(a_dir: Path, b_dir: Path) -> dict:
    import nibabel as nib

    n = diff = fg = fg_diff = 0
    for a in sorted(a_dir.glob("*.nii.gz")):
        x = np.asarray(nib.load(str(a)).dataobj)
        y = np.asarray(nib.load(str(b_dir / a.name)).dataobj)
        d = x != y
        f = (x > 0) | (y > 0)
        n, diff, fg, fg_diff = n + x.size, diff + int(d.sum()), fg + int(f.sum()), fg_diff + int((d & f).sum())
    return {"voxels_differ": diff / max(n, 1), "foreground_voxels_differ": fg_diff / max(fg, 1), "n_differ": diff}


def cmd_trained(args) -> None:
    import nibabel as nib
    import torch

    from flare23.evaluation.evaluate import evaluate_folders
    from flare23.roi.box import RoiBox

    torch.set_num_threads(args.threads)
    qs, work = Path(args.qs), Path(args.out)
    if args.roi == "whole":  # no ROI crop: the whole scan is the crop (more windows to skip than the product ever has)
        from flare23.inference import cascade

        cascade.locate = lambda net, image, affine, **k: RoiBox((0, 0, 0), tuple(image.shape), tuple(image.shape))  # noqa: E731
    ckpts = _checkpoints(args)
    images, refs = qs / "data" / "heldout" / "imagesTr", qs / "data" / "heldout" / "labelsTr"
    if args.cases:  # the first N held-out cases only, linked into the work folder
        chosen = sorted(images.glob("*_0000.nii.gz"))[: args.cases]
        images, refs = work / "images", work / "refs"
        for folder in (images, refs):
            folder.mkdir(parents=True, exist_ok=True)
        for img in chosen:
            ref = qs / "data" / "heldout" / "labelsTr" / img.name.replace("_0000.nii.gz", ".nii.gz")
            for src, dst in ((img, images / img.name), (ref, refs / ref.name)):
                if not dst.exists():
                    dst.symlink_to(src)
    margins = [float(v) for v in args.margins.split(",")]
    results = {}
    wanted = {c.strip() for c in args.configs.split(",") if c.strip()}
    for name, options in _configs(margins):
        if wanted and name != "off" and name not in wanted:
            continue
        out = work / name.replace(" ", "_").replace("+", "and")
        res = _run(images, out, ckpts, args.threads, options)
        summary = evaluate_folders(out, refs, out / "eval", progress=False)
        res.update(organ_dsc=summary["organ_dsc"], tumor_dsc=summary["tumor_dsc"], dir=str(out))
        results[name] = res
        print(name, json.dumps({k: v for k, v in res.items() if k != "per_case_windows"}), flush=True)
    off = results["off"]
    lines = ["| configuration | organ windows run / skipped | tumor windows run / skipped | organ network s (saved) | "
             "tumor network s (saved) | window_plan s | organ DSC (change) | tumor DSC (change) | voxels differing (foreground) |",
             "|" + "---|" * 9]  # fmt: skip
    for name, r in results.items():
        w, s = r["windows"], r["seconds"]
        d = _differ(Path(off["dir"]), Path(r["dir"]))
        r["differ"] = d

        def saved(part, w=w, s=s):
            return f"{s[f'{part}_network']:.1f} ({1 - s[f'{part}_network'] / max(off['seconds'][f'{part}_network'], 1e-9):+.1%})"

        lines.append(
            f"| {name} | {w['organ_windows_run']} / {w['organ_windows_skipped']} | {w['tumor_windows_run']} / {w['tumor_windows_skipped']} "
            f"| {saved('organ')} | {saved('tumor')} | {s['window_plan']:.2f} "
            f"| {r['organ_dsc']:.4f} ({r['organ_dsc'] - off['organ_dsc']:+.4f}) | {r['tumor_dsc']:.4f} ({r['tumor_dsc'] - off['tumor_dsc']:+.4f}) "
            f"| {d['voxels_differ']:.2e} ({d['foreground_voxels_differ']:.2e}) |"
        )
    # the paper's settings on the same cases: body from HU, hosts from the off run's labels, its ROI crop
    rows = []
    for img in sorted(images.glob("*.nii.gz")):
        case = img.name.replace("_0000.nii.gz", "")
        record = json.loads((Path(off["dir"]) / f"{case}_roi.json").read_text())["roi_box"]
        nii = nib.load(str(img))
        box = RoiBox(tuple(record["start"]), tuple(record["stop"]), tuple(nii.shape))
        hu, spacing = _crop_ras(np.asarray(nii.dataobj), nii.affine, box)
        labels, _ = _crop_ras(np.asarray(nib.load(str(Path(off["dir"]) / f"{case}.nii.gz")).dataobj), nii.affine, box)
        rows.append({"case": case, **paper_counts(hu, spacing, labels, margins)})
    table = "\n".join(lines)
    paper = "\n".join(_summarise_counts(rows, margins))
    print("\n" + table + "\n\npaper settings (patch, spacing, overlap), same cases and crops:\n" + paper)
    (work / "results.json").write_text(json.dumps({"results": results, "paper_counts": rows, "checkpoints": ckpts}, indent=1))
    (work / "results.md").write_text(table + "\n\n" + paper + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trained", help="held-out phantoms of a quickstart, trained weights, with and without skipping")
    t.add_argument("--qs", default="/tmp/qs", help="the quickstart's output folder")
    t.add_argument("--out", default="/tmp/bench_skip")
    t.add_argument("--margins", default="10,20", help="tumor_host_margin_mm values (mm); the last one is combined with the air rule")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--cases", type=int, default=0, help="only the first N held-out cases (default: all)")
    t.add_argument("--roi", choices=("model", "whole"), default="model",
                   help="model: the trained ROI extractor's crop (the product); whole: the whole scan as the crop")  # fmt: skip
    t.add_argument("--configs", default="", help="comma-separated configuration names to run (default: all; 'off' always runs)")
    for k in ("roi", "organ", "tumor"):
        t.add_argument(f"--{k}_ckpt", default=None)
    c = sub.add_parser("counts", help="windows at the paper's settings on full-size phantoms (no network runs)")
    c.add_argument("--seeds", default="3,4,5")
    c.add_argument("--slices", type=int, default=100)
    c.add_argument("--margins", default="10,20")
    c.add_argument("--nifti", action="append", default=[], help="IMAGE:LABELS, a scan and its reference labels (repeatable)")
    args = p.parse_args()
    {"trained": cmd_trained, "counts": cmd_counts}[args.cmd](args)


if __name__ == "__main__":
    main()
