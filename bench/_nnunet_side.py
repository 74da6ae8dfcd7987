"""The nnU-Net v2 side of ``bench/bench_compare.py``: a synthetic trained-model folder and nnU-Net's own inference path.

Runs in nnU-Net's own environment (``bench/.venv-nnunet``, see ``bench/nnunet_env.sh``); the pure
functions (:func:`nnunet_plans`, :func:`nnunet_dataset_json`) need only ``flare23.constants`` and
are imported by the project's environment too (tests, the driver).

Sub-commands (one process each, the result is the last ``RESULT {json}`` line on stdout)::

    python bench/_nnunet_side.py build   --model DIR --filters 4,8,16,16,16,16 [--arch resenc|plain] [--seed 0]
    python bench/_nnunet_side.py predict --model DIR --image IMG.nii.gz --out OUT.nii.gz [--device cpu] [--threads 2]
                                         [--settings equal|default]
    python bench/_nnunet_side.py export  --model DIR --work DIR [--threads 2]

* ``build``: writes ``DIR/dataset.json``, ``DIR/plans.json`` (one ``3d_fullres`` configuration with
  our organ model's spacing, patch, kernels, strides, CT fingerprint and 15 labels) and
  ``DIR/fold_0/checkpoint_final.pth`` with random weights (seeded) of the network that nnU-Net
  builds from those plans; reports its parameter count.
* ``predict``: nnU-Net's ``predict_from_files_sequential`` path, cut into timed stages with the
  very functions that it calls: ``read_images`` (SimpleITK), ``run_case_npy`` (crop to non-zero,
  CT normalisation, resampling to the target spacing: order 3 in-plane, separate z),
  ``predict_logits_from_preprocessed_data`` (Gaussian sliding window),
  ``convert_predicted_logits_to_segmentation_with_correct_shape`` (back to the original grid:
  logits resampled order 1 in-plane / order 0 along z, then arg-max, then un-cropping) and
  ``write_seg``. ``--settings`` (:func:`predictor_settings`): ``equal`` (the default here) runs the
  sliding window at our settings, ``tile_step_size`` = our organ step 0.8 and mirroring off;
  ``default`` runs it as nnU-Net's users do (``nnUNetv2_predict`` without options: step 0.5,
  test-time mirroring over the axes the checkpoint allows, all three).
* ``export``: the probability-to-label stage alone on the logits in ``WORK/logits.npy`` (the
  driver makes them); writes the label map to ``WORK/labels_nnunet.npy``.

The checkpoint is loaded by nnU-Net's own code with ``weights_only=False`` (its choice, acceptable
inside this benchmark environment only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flare23.constants import (  # noqa: E402  (pure module, importable from nnU-Net's environment)
    FINGERPRINT_DEFAULTS,
    KERNELS_XYZ,
    LABEL_KEYS,
    NUM_CLASSES,
    ORGAN_OVERLAP,
    ORGAN_PATCH_ZYX,
    ORGAN_SPACING_ZYX,
    ORGAN_STRIDES_XYZ,
)

ARCHS = {
    # one residual block per encoder stage after a stem conv; 2 convs per decoder stage (DynUNet's UnetUpBlock)
    "resenc": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    # 2 convs per encoder stage (DynUNet's res block without the skip), 2 per decoder stage
    "plain": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
}
CONFIGURATION = "3d_fullres"


def _zyx(per_stage_xyz) -> list[list[int]]:
    return [list(reversed([int(v) for v in k])) for k in per_stage_xyz]


def nnunet_plans(filters, arch: str = "resenc", *, spacing_zyx=None, patch_zyx=None, strides_xyz=None, fingerprint=None,
                 batch_size: int = 2, dataset_name: str = "Dataset999_Flare23Bench") -> dict:  # fmt: skip
    """nnU-Net v2 ``plans.json`` for our organ model: same spacing, patch, kernels, strides and fingerprint.

    nnU-Net reads NIfTI with SimpleITK, whose arrays are (z, y, x): every per-axis value is the
    ``_ZYX`` form of :mod:`flare23.constants` (``transpose_forward`` is the identity). The keywords
    replace the organ model's defaults for a training comparison (``bench/bench_training.py``):
    ``spacing_zyx``, ``patch_zyx``, ``strides_xyz`` (per stage, x, y, z as our configs write them) and
    ``fingerprint`` (``clip_low``, ``clip_high``, ``mean``, ``std``: the CT normalisation, as
    ``flare23 fingerprint`` writes it).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    filters = [int(f) for f in filters]
    n = len(filters)
    if n != len(KERNELS_XYZ):
        raise ValueError(f"filters must have {len(KERNELS_XYZ)} widths (one per stage), got {filters}")
    fp = dict(fingerprint or FINGERPRINT_DEFAULTS["organ"])
    strides = strides_xyz if strides_xyz is not None else ORGAN_STRIDES_XYZ
    arch_kwargs = {
        "n_stages": n,
        "features_per_stage": filters,
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": _zyx(KERNELS_XYZ),
        "strides": _zyx(strides),
        "n_conv_per_stage_decoder": [2] * (n - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    if arch == "resenc":
        arch_kwargs["n_blocks_per_stage"] = [1] * n
    else:
        arch_kwargs["n_conv_per_stage"] = [2] * n
    spacing = [float(v) for v in (spacing_zyx or ORGAN_SPACING_ZYX)]
    patch = [int(v) for v in (patch_zyx or ORGAN_PATCH_ZYX)]
    resampling = {
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": [100, 512, 512],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            CONFIGURATION: {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": int(batch_size),
                "patch_size": patch,
                "median_image_size_in_voxels": [100, 500, 500],
                "spacing": spacing,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                **resampling,
                "architecture": {
                    "network_class_name": ARCHS[arch],
                    "arch_kwargs": arch_kwargs,
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "flare23 bench (synthetic)",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 3071.0,
                "mean": fp["mean"],
                "median": fp["mean"],
                "min": -1024.0,
                "percentile_00_5": fp["clip_low"],
                "percentile_99_5": fp["clip_high"],
                "std": fp["std"],
            }
        },
    }


def nnunet_dataset_json() -> dict:
    """``dataset.json`` with the 15 FLARE labels (same ids) and one CT channel."""
    labels = {LABEL_KEYS[i]: i for i in range(NUM_CLASSES)}
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 0, "file_ending": ".nii.gz"}


def tile_step_size() -> float:
    """nnU-Net's step as a fraction of the patch, equal to our organ window's (1 - overlap)."""
    return round(1.0 - ORGAN_OVERLAP, 6)


#: ``--settings`` of ``predict``: ``equal`` = our sliding-window settings, ``default`` = nnU-Net's own defaults.
SETTINGS = ("equal", "default")
#: nnU-Net v2's defaults (``nnUNetPredictor``'s keyword defaults, ``nnUNetv2_predict`` without ``-step_size``
#: or ``--disable_tta``); ``tests/test_bench_compare.py`` checks them against the installed nnU-Net.
NNUNET_DEFAULTS = {"tile_step_size": 0.5, "use_gaussian": True, "use_mirroring": True}


def predictor_settings(settings: str = "equal") -> dict:
    """``nnUNetPredictor`` keywords for ``settings``: ``equal`` (step = ours, mirroring off) or ``default`` (nnU-Net's)."""
    if settings == "equal":
        return {"tile_step_size": tile_step_size(), "use_gaussian": True, "use_mirroring": False}
    if settings == "default":
        return dict(NNUNET_DEFAULTS)
    raise ValueError(f"settings must be one of {', '.join(SETTINGS)}, got {settings!r}")


# --- below: nnU-Net's environment only ------------------------------------------------------------
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build(model_dir: Path, filters, arch: str = "resenc", seed: int = 0) -> dict:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    model_dir = Path(model_dir)
    (model_dir / "fold_0").mkdir(parents=True, exist_ok=True)
    plans, dataset = nnunet_plans(filters, arch), nnunet_dataset_json()
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=2))
    (model_dir / "dataset.json").write_text(json.dumps(dataset, indent=2))
    pm = PlansManager(plans)
    cm = pm.get_configuration(CONFIGURATION)
    torch.manual_seed(seed)
    heads = pm.get_label_manager(dataset).num_segmentation_heads
    net = nnUNetTrainer.build_network_architecture(pm, cm, 1, heads, enable_deep_supervision=False)
    ckpt = {
        "network_weights": net.state_dict(),
        "trainer_name": "nnUNetTrainer",
        "init_args": {"configuration": CONFIGURATION},
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    torch.save(ckpt, str(model_dir / "fold_0" / "checkpoint_final.pth"))
    return {"parameters": sum(p.numel() for p in net.parameters()), "network": type(net).__name__, "heads": heads}


def _predictor(model_dir: Path, device: str, threads: int, settings: str = "equal"):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(threads)
    dev = torch.device(device)
    predictor = nnUNetPredictor(
        **predictor_settings(settings),
        perform_everything_on_device=dev.type == "cuda",
        device=dev,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    return predictor


def predict(model_dir: Path, image: Path, out: Path, device: str = "cpu", threads: int = 2, interval: float = 0.1,
            settings: str = "equal") -> dict:  # fmt: skip
    """One case through nnU-Net's inference path, timed per stage (see the module docstring)."""
    import numpy as np
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    from flare23.efficiency import EfficiencyMonitor

    times: dict[str, float] = {}
    monitor = EfficiencyMonitor(device=device, interval=interval)
    cuda = torch.device(device).type == "cuda"

    @contextlib.contextmanager
    def stage(name):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0

    with monitor:
        t_start = time.perf_counter()
        with stage("load_network"):
            predictor = _predictor(model_dir, device, threads, settings)
        pm, cm, dj = predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
        rw = pm.image_reader_writer_class()
        with stage("read"):
            data, props = rw.read_images([str(image)])
        with stage("preprocess"):
            data, _, props = cm.preprocessor_class(verbose=False).run_case_npy(data, None, props, pm, cm, dj)
            x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        del data
        with stage("network"):
            logits = predictor.predict_logits_from_preprocessed_data(x).cpu()
        del x
        with stage("to_original_grid"):
            seg = convert_predicted_logits_to_segmentation_with_correct_shape(logits, pm, cm, predictor.label_manager, props)
        del logits
        with stage("write"):
            rw.write_seg(seg, str(out), props)
        times["end_to_end_s"] = time.perf_counter() - t_start
    return {
        "stages": times,
        "peak_rss_mb": _peak_rss_mb(),
        "auc_mb_s": monitor.auc_mb_s,
        "peak_sampled_mb": monitor.peak_mb,
        "peak_torch_mb": monitor.peak_torch_mb,
        "preprocessed_shape": list(props["shape_after_cropping_and_before_resampling"]),
        "settings": {
            "name": settings,
            "tile_step_size": predictor.tile_step_size,
            "use_gaussian": predictor.use_gaussian,
            "use_mirroring": predictor.use_mirroring,
            # the axes nnU-Net mirrors (from the checkpoint, network axes z, y, x), or none
            "mirror_axes": list(predictor.allowed_mirroring_axes or ()) if predictor.use_mirroring else [],
        },
    }


def export(model_dir: Path, work: Path, threads: int = 2) -> dict:
    """The probability-to-label stage alone: nnU-Net's export of ``WORK/logits.npy`` to ``WORK/geometry.json``'s grid.

    ``logits.npy`` is ``(15, Z', Y', X')`` on the preprocessed (target-spacing) grid, nnU-Net's
    array order; the original grid is ``geometry["shape_zyx"]`` at ``geometry["spacing_zyx"]``,
    uncropped (the bounding box of non-zero voxels is the whole volume, as for a CT whose air
    is below zero).
    """
    import numpy as np
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    torch.set_num_threads(threads)
    work, model_dir = Path(work), Path(model_dir)
    geometry = json.loads((work / "geometry.json").read_text())
    shape = [int(v) for v in geometry["shape_zyx"]]
    pm = PlansManager(json.loads((model_dir / "plans.json").read_text()))
    cm = pm.get_configuration(CONFIGURATION)
    lm = pm.get_label_manager(json.loads((model_dir / "dataset.json").read_text()))
    props = {
        "spacing": [float(v) for v in geometry["spacing_zyx"]],
        "shape_before_cropping": shape,
        "bbox_used_for_cropping": [[0, s] for s in shape],
        "shape_after_cropping_and_before_resampling": shape,
    }
    logits = torch.from_numpy(np.load(work / "logits.npy"))
    t0 = time.perf_counter()
    seg = convert_predicted_logits_to_segmentation_with_correct_shape(logits, pm, cm, lm, props, num_threads_torch=threads)
    seconds = time.perf_counter() - t0
    np.save(work / "labels_nnunet.npy", np.ascontiguousarray(seg, dtype=np.uint8))
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("build", "predict", "export"))
    p.add_argument("--model", required=True)
    p.add_argument("--filters", default="4,8,16,16,16,16")
    p.add_argument("--arch", choices=tuple(ARCHS), default="resenc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image")
    p.add_argument("--out")
    p.add_argument("--work")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--settings", choices=SETTINGS, default="equal", help="sliding window: ours (equal) or nnU-Net's defaults")
    args = p.parse_args(argv)
    if args.command == "build":
        result = build(Path(args.model), [int(v) for v in args.filters.split(",")], args.arch, args.seed)
    elif args.command == "predict":
        result = predict(Path(args.model), Path(args.image), Path(args.out), args.device, args.threads, settings=args.settings)
    else:
        result = export(Path(args.model), Path(args.work), args.threads)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
