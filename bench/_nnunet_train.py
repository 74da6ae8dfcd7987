"""The nnU-Net v2 side of ``bench/bench_training.py``: its own preprocessing, trainer and inference, under a time budget.

Runs in nnU-Net's own environment (``bench/.venv-nnunet``, see ``bench/nnunet_env.sh``), one process
per sub-command; the result is the last ``RESULT {json}`` line on stdout. ``nnUNet_raw``,
``nnUNet_preprocessed`` and ``nnUNet_results`` are set from ``--work`` before nnU-Net is imported
(it reads them at import)::

    python bench/_nnunet_train.py prepare --work DIR --data CROPS --plans PLANS.json [--dataset_id 998]
    python bench/_nnunet_train.py train   --work DIR --budget_s 2400 [--threads 1] [--epoch_length 50] [--clock wall|cpu]
    python bench/_nnunet_train.py predict --work DIR --images DIR --out DIR [--settings default|equal] [--threads 1]

* ``prepare``: ``CROPS`` is a folder written by ``flare23 crop`` (``imagesTr``, ``labelsTr``,
  ``datalist.json``). Its cases become ``nnUNet_raw/Dataset<id>_Flare23Train`` (links, no copies),
  ``splits_final.json`` fold 0 = the datalist's training / validation cases (the same split as
  ours), ``PLANS.json`` (from :func:`_nnunet_side.nnunet_plans`: our spacing, patch, widths, strides
  and CT normalisation) becomes ``nnUNetPlans.json``; then nnU-Net's own fingerprint extraction and
  preprocessing (crop to non-zero, CT normalisation, resampling) with one process.
* ``train``: nnU-Net's own ``nnUNetTrainer`` (SGD 0.01, Nesterov 0.99, poly decay, Dice + CE with deep
  supervision, its augmentation, 33 % foreground oversampling, batch and patch from the plans), with
  two changes that a fixed time budget needs, and nothing else: (1) an epoch is ``epoch_length``
  iterations (ours: 50; nnU-Net's 250 only sets how often it validates and logs) with validation
  iterations scaled by the same factor (50 per 250: 10 per 50), and (2) the number of epochs is fitted
  to the budget by the rule of our ``flare23.training.resume.TimeBudget``: the first epoch is warm-up,
  after epochs 2 and 3 ``num_epochs`` becomes what fits in the time left (the poly horizon with it, so
  the decay ends at the budget), then a run stops at an epoch end when the next epoch would not fit.
  ``nnUNet_n_proc_DA=0``: augmentation in the training process (one thread, as ours with
  ``num_workers`` 0). The final checkpoint (``checkpoint_final.pth``, what ``nnUNetv2_predict`` loads by
  default) is used; nnU-Net's own final validation is skipped (the driver scores held-out cases).
* ``predict``: ``nnUNetPredictor`` on every ``*_0000.nii.gz`` of ``--images`` (its sequential path),
  ``--settings default`` = as its users run it (step 0.5, mirroring over the allowed axes),
  ``equal`` = our sliding-window step and no mirroring.

The checkpoint is loaded by nnU-Net's own code with ``weights_only=False`` (its choice, acceptable
inside this benchmark environment only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for p in (str(ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

CONFIGURATION = "3d_fullres"
DATASET_NAME = "Flare23Train"
#: nnU-Net's own validation iterations per training iteration (50 per epoch of 250).
VAL_PER_TRAIN = 50 / 250


def dataset_folder_name(dataset_id: int) -> str:
    return f"Dataset{int(dataset_id):03d}_{DATASET_NAME}"


def set_paths(work: Path) -> dict[str, str]:
    """nnU-Net's three folders under ``work`` (set before nnunetv2 is imported)."""
    work = Path(work).resolve()
    paths = {k: str(work / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for v in paths.values():
        Path(v).mkdir(parents=True, exist_ok=True)
    os.environ.update(paths)
    return paths


def fit_epochs(epoch: int, done: int, t0: float, t_first: float, last: float, now: float, budget_s: float,
               num_epochs: int, calibration: int = 2) -> tuple[int, bool]:  # fmt: skip
    """``(num_epochs, stop)`` after ``done`` completed epochs (the last one numbered ``epoch``, 1-based), TimeBudget's rule.

    ``t0``: start; ``t_first``: end of the warm-up epoch; ``last``: the last epoch's seconds.
    """
    if done <= 1:
        return num_epochs, False
    per_epoch = max((now - t_first) / (done - 1), last)
    left = t0 + budget_s - now
    if done <= 1 + calibration:
        fit = epoch + max(1, int(left // per_epoch)) if per_epoch > 0 else num_epochs
        return min(num_epochs, fit), False
    return num_epochs, bool(left < per_epoch and epoch < num_epochs)


def _links(data: Path, raw: Path, datalist: dict) -> tuple[list[str], list[str]]:
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    split = {"training": [], "validation": []}
    for part in split:
        for item in datalist.get(part, []):
            image, label = data / item["image"], data / item["label"]
            case = label.name[: -len(".nii.gz")]
            split[part].append(case)
            for src, dst in ((image, raw / "imagesTr" / f"{case}_0000.nii.gz"), (label, raw / "labelsTr" / f"{case}.nii.gz")):
                if not dst.exists():
                    dst.symlink_to(src.resolve())
    return split["training"], split["validation"]


def prepare(work: Path, data: Path, plans_file: Path, dataset_id: int = 998) -> dict:
    paths = set_paths(work)
    from _nnunet_side import nnunet_dataset_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess_dataset

    name = dataset_folder_name(dataset_id)
    raw = Path(paths["nnUNet_raw"]) / name
    datalist = json.loads((data / "datalist.json").read_text())
    train, val = _links(data, raw, datalist)
    ds = nnunet_dataset_json()
    ds["numTraining"] = len(train) + len(val)
    (raw / "dataset.json").write_text(json.dumps(ds, indent=2))
    pre = Path(paths["nnUNet_preprocessed"]) / name
    pre.mkdir(parents=True, exist_ok=True)
    plans = json.loads(plans_file.read_text())
    plans["dataset_name"] = name
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans, indent=2))
    (pre / "dataset.json").write_text(json.dumps(ds, indent=2))  # nnU-Net's planner copies it there
    (pre / "splits_final.json").write_text(json.dumps([{"train": train, "val": val}], indent=2))
    t0 = time.perf_counter()
    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True, clean=True, verbose=False)
    preprocess_dataset(dataset_id, "nnUNetPlans", (CONFIGURATION,), (1,), verbose=False, show_progress_bar=False)
    return {"dataset": name, "train": len(train), "val": len(val), "seconds": time.perf_counter() - t0}


def _trainer_class():
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class BudgetTrainer(nnUNetTrainer):
        """nnUNetTrainer fitted to a budget of wall or CPU time (see the module docstring); everything else its own."""

        budget_s = 0.0
        epoch_length = 50
        clock = staticmethod(time.monotonic)

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device=torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)  # nnU-Net records these arguments by name
            self.num_iterations_per_epoch = int(self.epoch_length)
            self.num_val_iterations_per_epoch = max(1, round(self.epoch_length * VAL_PER_TRAIN))
            self.iterations = 0
            self.log_epochs: list[dict] = []

        def train_step(self, batch: dict) -> dict:
            out = super().train_step(batch)
            self.iterations += 1
            return out

        def run_training(self):  # nnU-Net's loop with a horizon that may shrink
            self.on_train_start()
            t0 = self.clock()
            t_first = t_last = None
            done = 0
            while self.current_epoch < self.num_epochs:
                self.on_epoch_start()
                self.on_train_epoch_start()
                outs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
                self.on_train_epoch_end(outs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    vals = [self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)]
                    self.on_validation_epoch_end(vals)
                self.on_epoch_end()  # increments current_epoch
                now = self.clock()
                done += 1
                last, t_last = now - (t_last or t0), now
                if done == 1:
                    t_first = now
                fit, stop = fit_epochs(self.current_epoch, done, t0, t_first or now, last, now, self.budget_s, self.num_epochs)
                if fit != self.num_epochs:
                    self.num_epochs = fit
                    self.lr_scheduler.max_steps = fit
                    self.print_to_log_file(f"time budget {self.budget_s:.0f} s: num_epochs set to {fit}")
                self.log_epochs.append({"epoch": self.current_epoch, "s": round(now - t0, 1),
                                        "pseudo_dice": float(self.logger.get_value("mean_fg_dice", step=-1))})  # fmt: skip
                if stop:
                    self.print_to_log_file(f"time budget {self.budget_s:.0f} s: stopping after epoch {self.current_epoch}")
                    break
            self.on_train_end()

    # nnU-Net names the results folder and the checkpoint's ``trainer_name`` after the class, and its predictor
    # looks that name up inside nnunetv2: the budget only changes the training loop, so the trained model is
    # stored as nnUNetTrainer's (the network is built by nnUNetTrainer.build_network_architecture either way).
    BudgetTrainer.__name__ = BudgetTrainer.__qualname__ = "nnUNetTrainer"
    return BudgetTrainer


#: The budget's clock (as ``TimeBudget``'s ``time_budget_clock``): wall time, or this process's CPU time.
CLOCKS = {"wall": time.monotonic, "cpu": time.process_time}


def train(work: Path, budget_s: float, threads: int = 1, epoch_length: int = 50, dataset_id: int = 998, seed: int = 0,
          clock: str = "wall") -> dict:  # fmt: skip
    paths = set_paths(work)
    os.environ["nnUNet_n_proc_DA"] = "0"
    os.environ.setdefault("nnUNet_compile", "f")
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    name = dataset_folder_name(dataset_id)
    pre = Path(paths["nnUNet_preprocessed"]) / name
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    plans["continue_training"] = False  # nnUNetv2_train's run_training sets it; the trainer pops it
    cls = _trainer_class()
    cls.budget_s, cls.epoch_length, cls.clock = float(budget_s), int(epoch_length), staticmethod(CLOCKS[clock])
    trainer = cls(plans=plans, configuration=CONFIGURATION, fold=0, dataset_json=dataset_json, device=torch.device("cpu"))
    t0 = time.perf_counter()
    trainer.run_training()
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "iterations": trainer.iterations,
        "patches": trainer.iterations * int(trainer.batch_size),
        "batch_size": int(trainer.batch_size),
        "epochs": trainer.current_epoch,
        "epoch_length": trainer.num_iterations_per_epoch,
        "val_iterations_per_epoch": trainer.num_val_iterations_per_epoch,
        "patches_per_s": trainer.iterations * int(trainer.batch_size) / seconds,
        "epochs_log": trainer.log_epochs,
        "checkpoint": str(Path(trainer.output_folder) / "checkpoint_final.pth"),
        "model_dir": str(trainer.output_folder_base),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def predict(work: Path, images: Path, out: Path, settings: str = "default", threads: int = 1, dataset_id: int = 998) -> dict:
    paths = set_paths(work)
    import torch
    from _nnunet_side import predictor_settings
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(threads)
    model_dir = Path(paths["nnUNet_results"]) / dataset_folder_name(dataset_id) / f"nnUNetTrainer__nnUNetPlans__{CONFIGURATION}"
    if not model_dir.is_dir():  # the trainer's class name is the folder's first part
        found = sorted(Path(paths["nnUNet_results"], dataset_folder_name(dataset_id)).glob(f"*__nnUNetPlans__{CONFIGURATION}"))
        if not found:
            raise SystemExit(f"{work}: no trained nnU-Net model (run train first)")
        model_dir = found[0]
    p = nnUNetPredictor(**predictor_settings(settings), perform_everything_on_device=False, device=torch.device("cpu"),
                        verbose=False, verbose_preprocessing=False, allow_tqdm=False)  # fmt: skip
    p.initialize_from_trained_model_folder(str(model_dir), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    files = sorted(Path(images).glob("*_0000.nii.gz"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    p.predict_from_files_sequential([[str(f)] for f in files], [str(out / f.name[: -len("_0000.nii.gz")]) for f in files],
                                    save_probabilities=False, overwrite=True)  # fmt: skip
    return {"cases": len(files), "seconds": time.perf_counter() - t0, "settings": predictor_settings(settings)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("prepare", "train", "predict"))
    ap.add_argument("--work", required=True)
    ap.add_argument("--data")
    ap.add_argument("--plans")
    ap.add_argument("--dataset_id", type=int, default=998)
    ap.add_argument("--budget_s", type=float, default=2400.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epoch_length", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="the budget's clock (wall, or CPU time)")
    ap.add_argument("--images")
    ap.add_argument("--out")
    ap.add_argument("--settings", choices=("default", "equal"), default="default")
    a = ap.parse_args(argv)
    work = Path(a.work)
    if a.command == "prepare":
        result = prepare(work, Path(a.data), Path(a.plans), a.dataset_id)
    elif a.command == "train":
        result = train(work, a.budget_s, a.threads, a.epoch_length, a.dataset_id, a.seed, a.clock)
    else:
        result = predict(work, Path(a.images), Path(a.out), a.settings, a.threads, a.dataset_id)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
