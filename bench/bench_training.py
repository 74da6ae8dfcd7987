"""Training parity: our organ_seg / tumor_seg training against nnU-Net v2's on the same data, budget and machine.

    python bench/bench_training.py --model organ --train_data data/bt_train --heldout_data data/bt_heldout \\
        --work runs/bench_training --budget_min 40

Both systems train side by side (two processes, ``--threads`` torch threads each, data loading in
the training process) for the same budget (``--clock cpu``, the default: each process's own CPU time,
so trainings that share cores, or a machine under other load, still get the same compute; ``wall``:
wall clock) on the same crops, then segment the same
held-out crops with their own inference and are scored by ``flare23 evaluate`` (FLARE rules, plus
the lesion-wise tumor scores):

* data: ``--train_data`` and ``--heldout_data`` are ``flare23 phantoms`` folders (or any folder with
  ``imagesTr`` / ``labelsTr``); both are cropped with ``flare23 crop --model MODEL`` (the tumor
  model's selection applies to ``tumor``), the split is the training crop's ``datalist.json``
  (nnU-Net's fold 0 is the same split), and the CT normalisation comes from ``flare23 fingerprint``
  of the training crops (both systems normalise with it).
* ours: ``bundles/<model>_seg/configs/train.json`` + ``train_cpu.json`` with the widths, spacing and
  patch given here, ``time_budget_s`` = the budget (``flare23.training.resume.TimeBudget`` fits the
  epochs and the poly horizon), epochs of ``--epoch_length`` iterations, validation every ``--val_interval`` (5) epochs;
  then the bundle's ``inference.json`` with the best-validation ``model.pt``.
* nnU-Net v2: ``bench/_nnunet_train.py`` (its own trainer, augmentation, sampling and loss, plans
  with the same network, spacing, patch, batch and normalisation; the budget fitted with the same
  rule); then ``nnUNetPredictor`` with ``checkpoint_final.pth``, as its users run it (step 0.5,
  mirroring) and at our settings (``nnunet_equal``: our step, no mirroring).

Writes ``WORK/result.json`` and ``WORK/result.md`` (the table for ``bench/README.md``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_pipeline import _hardware as hardware  # noqa: E402  (one description of the machine for every bench)

from flare23.constants import LABEL_KEYS, ORGAN_IDS, ORGAN_STRIDES_XYZ, TUMOR_ID, TUMOR_STRIDES_XYZ  # noqa: E402

NNUNET_PY = BENCH / ".venv-nnunet" / "bin" / "python"
STRIDES = {"organ": ORGAN_STRIDES_XYZ, "tumor": TUMOR_STRIDES_XYZ}
SYSTEMS = ("ours", "nnunet", "nnunet_equal")
#: One line per iteration in our training log (MONAI's StatsHandler): "Epoch: 3/45, Iter: 12/50 -- train_loss: ...".
_ITER = re.compile(r"Epoch: (\d+)/(\d+), Iter: (\d+)/(\d+) -- train_loss")


def count_iterations(log_text: str) -> dict:
    """Iterations and epochs of our training from its log (StatsHandler's per-iteration lines)."""
    its = _ITER.findall(log_text)
    epochs = {int(e) for e, *_ in its}
    fitted = re.findall(r"max_epochs set to (\d+)", log_text)
    return {"iterations": len(its), "epochs": max(epochs) if epochs else 0, "fitted_epochs": int(fitted[-1]) if fitted else None}


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",")]


def _floats(text: str) -> list[float]:
    return [float(v) for v in str(text).split(",")]


def _env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _check(cmd: list[str], log: Path, env: dict) -> str:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    text = log.read_text(errors="replace")
    if rc != 0:
        raise SystemExit(f"bench_training: {' '.join(cmd[:4])} ... failed (exit {rc}); see {log}:\n{text[-3000:]}")
    return text


def _result_line(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :]) if lines else {}


def prepare_data(args, work: Path) -> dict:
    """Crops for ``args.model`` of the training and held-out phantoms, and the fingerprint of the training crops."""
    flare = [sys.executable, "-m", "flare23"]
    data = work / "data"
    out = {}
    for part, src, val in (("train", Path(args.train_data), args.validation_fraction), ("heldout", Path(args.heldout_data), 0.0)):
        dst = data / part
        if not (dst / "datalist.json").is_file():
            cmd = flare + ["crop", str(src / "imagesTr"), str(src / "labelsTr"), str(dst), "--model", args.model,
                           "--validation_fraction", str(val), "--workers", str(args.workers)]  # fmt: skip
            if args.margin_mm is not None:
                cmd += ["--margin_mm", str(args.margin_mm)]
            _check(cmd, work / "logs" / f"crop_{part}.log", _env(args.threads))
        out[part] = dst
    fp = data / "fingerprint.json"
    if not fp.is_file():
        cmd = flare + [
            "fingerprint",
            str(data / "train" / "imagesTr"),
            str(data / "train" / "labelsTr"),
            str(fp),
            "--workers",
            str(args.workers),
        ]
        _check(cmd, work / "logs" / "fingerprint.log", _env(args.threads))
    out["fingerprint"] = fp
    return out


def ours_train_cmd(args, data: dict, ckpt: Path, out_dir: Path) -> list[str]:
    b = f"bundles/{args.model}_seg/configs"
    return [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", f"['{b}/train.json','{b}/train_cpu.json']",
        "--dataset_dir", str(data["train"]), "--fingerprint_file", str(data["fingerprint"]),
        "--target_spacing", json.dumps(_floats(args.spacing)), "--patch_size", json.dumps(_ints(args.patch)),
        "--network_def#filters", json.dumps(_ints(args.filters)),
        "--max_epochs", "1000", "--time_budget_s", str(args.budget_min * 60.0), "--time_budget_clock", args.clock,
        "--epoch_length", str(args.epoch_length),
        "--batch_size", str(args.batch_size), "--val_interval", str(args.val_interval), "--num_workers", "0", "--sw_batch_size", "1",
        "--ckpt_dir", str(ckpt), "--output_dir", str(out_dir), "--device", "cpu",
    ]  # fmt: skip


def ours_infer_cmd(args, data: dict, ckpt: Path, pred: Path) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "evaluating",
        "--config_file", f"bundles/{args.model}_seg/configs/inference.json",
        "--ckpt_path", str(ckpt / "model.pt"), "--dataset_dir", str(data["heldout"] / "imagesTr"),
        "--output_dir", str(pred), "--device", "cpu", "--sw_batch_size", "1",
    ]  # fmt: skip


def nnunet_plans_file(args, fingerprint: Path, path: Path) -> Path:
    from _nnunet_side import nnunet_plans

    fp = json.loads(fingerprint.read_text())
    plans = nnunet_plans(
        _ints(args.filters),
        args.arch,
        spacing_zyx=list(reversed(_floats(args.spacing))),
        patch_zyx=list(reversed(_ints(args.patch))),
        strides_xyz=STRIDES[args.model],
        fingerprint={k: float(fp[k]) for k in ("clip_low", "clip_high", "mean", "std")},
        batch_size=args.batch_size,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plans, indent=2))
    return path


def train_side_by_side(cmds: dict[str, list[str]], logs: dict[str, Path], env: dict) -> dict[str, dict]:
    """Start every training at once, wait for all; seconds and log text per system (a failure stops the run)."""
    procs, out = {}, {}
    for name, cmd in cmds.items():
        logs[name].parent.mkdir(parents=True, exist_ok=True)
        fh = open(logs[name], "w")
        procs[name] = (subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT), fh, time.perf_counter())
    for name, (p, fh, t0) in procs.items():
        _, status, usage = os.wait4(p.pid, 0)  # the child's own CPU time: what it got of the shared cores
        p.returncode = rc = os.waitstatus_to_exitcode(status)
        fh.close()
        text = logs[name].read_text(errors="replace")
        if rc != 0:
            raise SystemExit(f"bench_training: training {name} failed (exit {rc}); see {logs[name]}:\n{text[-3000:]}")
        out[name] = {"seconds": time.perf_counter() - t0, "cpu_s": usage.ru_utime + usage.ru_stime, "log": text}
    return out


def scores(eval_dir: Path) -> dict:
    """The FLARE scores, per class DSC / NSD and the lesion summary from ``flare23 evaluate``'s outputs."""
    s = json.loads((eval_dir / "summary.json").read_text())
    return {
        "organ_dsc": s["organ_dsc"],
        "organ_nsd": s["organ_nsd"],
        "tumor_dsc": s["tumor_dsc"],
        "tumor_nsd": s["tumor_nsd"],
        "per_class": {k: {"dsc": v["dsc"], "nsd": v["nsd"]} for k, v in s["per_class"].items()},
        "lesions": s.get("lesions"),
        "n_cases": s["n_cases"],
    }


def lesion_counts(eval_dir: Path) -> dict:
    """Reference lesions, detected lesions and false-positive components, from ``lesions.csv``."""
    rows = list(csv.DictReader(open(eval_dir / "lesions.csv")))
    ref = [r for r in rows if not r["lesion"].startswith("fp")]
    return {"lesions": len(ref), "detected": sum(r["detected"] == "1" for r in ref), "fp_components": len(rows) - len(ref)}


_CLOCK_WORDS = {"cpu": "CPU time", "wall": "wall clock"}


def _f(v, nd=3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def markdown(result: dict) -> str:
    """The parity table: one row per system, then per class DSC."""
    s = result["settings"]
    lines = [
        f"Training parity, {s['model']} model: budget {s['budget_min']:g} min of {_CLOCK_WORDS[s.get('clock', 'wall')]} per system, "
        f"{s['threads']} thread(s) each, side by side; "
        f"widths {s['filters']}, spacing {s['spacing']} mm (x, y, z), patch {s['patch']}, batch {s['batch_size']}; "
        f"{s['train_cases']} training / {s['val_cases']} validation crops, {s['heldout_cases']} held-out crops; {result['hardware']}.",
        "",
        "| system | CPU min | iterations | patches | patches / CPU s | epochs | mean organ DSC | organ NSD | tumor DSC | tumor NSD | lesions found | FP components |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in SYSTEMS:
        r = result["systems"].get(name)
        if not r:
            continue
        t, sc, lc = r["training"], r["scores"], r.get("lesion_counts", {})
        found = f"{lc.get('detected', '-')} / {lc.get('lesions', '-')}" if lc else "-"
        lines.append(
            f"| {r['label']} | {_f(t['cpu_s'] / 60, 1) if t.get('cpu_s') else '-'} | {t['iterations']} | {t['patches']} | {_f(t['patches'] / t['cpu_s'] if t.get('cpu_s') else None, 2)} | {t['epochs']} | "
            f"{_f(sc['organ_dsc'])} | {_f(sc['organ_nsd'])} | {_f(sc['tumor_dsc'])} | {_f(sc['tumor_nsd'])} | {found} | {lc.get('fp_components', '-')} |"
        )
    names = [LABEL_KEYS[i] for i in (*ORGAN_IDS, TUMOR_ID)]
    present = [n for n in SYSTEMS if n in result["systems"]]
    lines += [
        "",
        "| class | " + " | ".join(result["systems"][n]["label"] for n in present) + " |",
        "|---" * (len(present) + 1) + "|",
    ]
    for c in names:
        vals = [result["systems"][n]["scores"]["per_class"].get(c, {}).get("dsc") for n in present]
        lines.append(f"| {c} | " + " | ".join(_f(v) for v in vals) + " |")
    return "\n".join(lines) + "\n"


def render(work: str) -> str:
    """The table again from ``WORK/result.json`` (``python bench/bench_training.py --render WORK``)."""
    md = markdown(json.loads((Path(work) / "result.json").read_text()))
    (Path(work) / "result.md").write_text(md)
    return md


def main(argv=None) -> dict:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--render"]:
        print(render(argv[1]))
        return {}
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("organ", "tumor"), required=True)
    ap.add_argument("--train_data", required=True)
    ap.add_argument("--heldout_data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--budget_min", type=float, default=40.0)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="the budget's clock: each training's own CPU time (default; fair when trainings share cores) or wall time")  # fmt: skip
    ap.add_argument("--systems", default="ours,nnunet", help="ours and/or nnunet (nnunet also predicts at our settings)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--filters", default="8,16,32,64,64,64")
    ap.add_argument("--spacing", default="2.75,2.75,4.0", help="x,y,z mm")
    ap.add_argument("--patch", default="64,64,32", help="x,y,z voxels")
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--epoch_length", type=int, default=50)
    ap.add_argument("--val_interval", type=int, default=5, help="our validation every N epochs (best-validation model.pt)")
    ap.add_argument("--validation_fraction", type=float, default=0.1)
    ap.add_argument("--margin_mm", type=float, default=None)
    ap.add_argument("--arch", choices=("resenc", "plain"), default="resenc")
    ap.add_argument("--workers", type=int, default=2, help="processes for cropping and the fingerprint (not timed)")
    a = ap.parse_args(argv)
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    if not systems or any(s not in ("ours", "nnunet") for s in systems):
        raise SystemExit(f"--systems {a.systems!r}: expected ours and/or nnunet")
    if "nnunet" in systems and not NNUNET_PY.is_file():
        raise SystemExit(f"{NNUNET_PY}: nnU-Net's environment is missing; run: bash bench/nnunet_env.sh")
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(a, work)
    env = _env(a.threads)
    nn_work = work / "nnunet"
    if "nnunet" in systems:
        plans = nnunet_plans_file(a, data["fingerprint"], nn_work / "plans.json")
        _check([str(NNUNET_PY), str(BENCH / "_nnunet_train.py"), "prepare", "--work", str(nn_work), "--data", str(data["train"]),
                "--plans", str(plans)], work / "logs" / "nnunet_prepare.log", env)  # fmt: skip
    cmds, logs = {}, {}
    if "ours" in systems:
        cmds["ours"] = ours_train_cmd(a, data, work / "ours" / "ckpt", work / "ours" / "runs")
        logs["ours"] = work / "logs" / "ours_train.log"
    if "nnunet" in systems:
        cmds["nnunet"] = [str(NNUNET_PY), str(BENCH / "_nnunet_train.py"), "train", "--work", str(nn_work), "--budget_s",
                          str(a.budget_min * 60.0), "--threads", str(a.threads), "--epoch_length", str(a.epoch_length),
                          "--clock", a.clock]  # fmt: skip
        logs["nnunet"] = work / "logs" / "nnunet_train.log"
    trained = train_side_by_side(cmds, logs, env)

    result: dict = {"settings": {}, "systems": {}, "hardware": hardware(a.threads)}
    datalist = json.loads((data["train"] / "datalist.json").read_text())
    result["settings"] = {
        "model": a.model, "budget_min": a.budget_min, "clock": a.clock, "threads": a.threads, "filters": a.filters, "spacing": a.spacing,
        "patch": a.patch, "batch_size": a.batch_size, "epoch_length": a.epoch_length, "arch_nnunet": a.arch,
        "train_cases": len(datalist.get("training", [])), "val_cases": len(datalist.get("validation", [])),
        "heldout_cases": len(list((data["heldout"] / "labelsTr").glob("*.nii.gz"))),
    }  # fmt: skip
    flare = [sys.executable, "-m", "flare23"]
    labels = str(data["heldout"] / "labelsTr")
    if "ours" in systems:
        t = count_iterations(trained["ours"]["log"])
        t.update(seconds=trained["ours"]["seconds"], cpu_s=trained["ours"]["cpu_s"], patches=t["iterations"] * a.batch_size)
        t["patches_per_s"] = t["patches"] / t["seconds"]
        pred = work / "ours" / "pred"
        _check(ours_infer_cmd(a, data, work / "ours" / "ckpt", pred), work / "logs" / "ours_infer.log", env)
        _check(
            flare + ["evaluate", str(pred), labels, "--out", str(work / "ours" / "eval")], work / "logs" / "ours_eval.log", env
        )
        result["systems"]["ours"] = {"label": "ours (MONAI, best-validation model.pt)", "training": t,
                                     "scores": scores(work / "ours" / "eval"), "lesion_counts": lesion_counts(work / "ours" / "eval")}  # fmt: skip
    if "nnunet" in systems:
        t = _result_line(trained["nnunet"]["log"])
        t.pop("epochs_log", None)
        t["cpu_s"] = trained["nnunet"]["cpu_s"]
        for name, settings, label in (("nnunet", "default", "nnU-Net v2 (its inference defaults: step 0.5, mirroring)"),
                                      ("nnunet_equal", "equal", "nnU-Net v2 (our inference settings)")):  # fmt: skip
            pred = nn_work / f"pred_{settings}"
            _check([str(NNUNET_PY), str(BENCH / "_nnunet_train.py"), "predict", "--work", str(nn_work), "--images",
                    str(data["heldout"] / "imagesTr"), "--out", str(pred), "--settings", settings, "--threads", str(a.threads)],
                   work / "logs" / f"nnunet_predict_{settings}.log", env)  # fmt: skip
            ev = nn_work / f"eval_{settings}"
            _check(flare + ["evaluate", str(pred), labels, "--out", str(ev)], work / "logs" / f"{name}_eval.log", env)
            result["systems"][name] = {"label": label, "training": t, "scores": scores(ev), "lesion_counts": lesion_counts(ev)}
    (work / "result.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (work / "result.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
