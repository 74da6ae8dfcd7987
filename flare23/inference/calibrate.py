"""``flare23 calibrate SCANS --out DIR``: calibration inputs for int8, and the int8 networks themselves (issue 23, item 2).

int8 is NNCF's post-training quantisation of the OpenVINO organ and tumor networks
(:mod:`flare23.inference.engine`). It needs inputs like those the networks will see: this command
runs the pipeline's own steps on the scans the user names (the ROI network, the crop, each fine model's
resampling and CT normalisation, all from the pipeline bundle and its sub-bundles with the same
overrides as ``flare23 segment``) and stores each model's input for each scan's crop in DIR (float16
``.npy``, with their SHA-256 and the settings that made them in ``DIR/calibration.json``). It then
quantises both networks on windows drawn from them and caches the result where ``flare23 segment``
looks (``engine_cache``, beside the organ checkpoint), so that

    flare23 segment -i IN -o OUT --engine openvino --precision int8 --int8_calibration DIR

starts at once. A retrained model with the same settings is quantised again from DIR on its first
run; a model whose spacing or normalisation differs from DIR's is refused (one line). The ROI
network stays fp32 (its input size varies per scan, and it is a few percent of the time).

Per network the command prints the conversion time and how many voxels of a few calibration windows
get the same label from int8 as from fp32.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from flare23.errors import Flare23Error
from flare23.io import atomic_path, file_sha256

#: Overrides that make no sense for calibration (it writes no segmentation, and prepares fp32 inputs).
_NOT_FOR_CALIBRATE = {"dataset_dir", "output_dir", "output_format", "precision", "int8_calibration", "engine", "device"}
DEFAULT_WINDOWS = 32


def _pipeline(bundles_dir, overrides: dict):
    """The pipeline bundle's parser with ``overrides`` (checked like ``flare23 segment``'s)."""
    from monai.bundle import ConfigParser

    from flare23.inference.segment import check_overrides, pipeline_config

    check_overrides(overrides, bundles_dir)
    config = pipeline_config(bundles_dir)
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(config.parents[1])
    parser["precision"] = "fp32"
    for key, value in overrides.items():
        parser[key] = value
    # int8 runs on the CPU, and the networks are traced for OpenVINO there: the calibration runs there too
    parser["device"] = "$torch.device('cpu')"
    return parser


def calibrate(scans, out, windows: int = DEFAULT_WINDOWS, bundles_dir=None, threads=None, quantize: bool = True, **overrides) -> Path:
    """Write DIR (``out``): each fine model's inputs for each case in ``scans``, ``calibration.json``; then quantise.

    Args:
        scans: a path or a list of paths (NIfTI files, folders of them, DICOM series folders).
        out: the calibration folder (created; files of an earlier calibration there are replaced).
        windows: windows per network that NNCF's statistics are taken on (more: slower, usually closer to fp32).
        quantize: also quantise both networks now and cache them (False: DIR only, quantised on the first run).
        overrides: pipeline bundle ids, as for ``flare23 segment`` (weights, sub-bundle overrides, ...); it runs on the CPU, where int8 runs.
    """
    from flare23.data.readers import list_cases, read_case
    from flare23.efficiency import parse_threads, set_threads
    from flare23.inference.cascade import crop_to_box, prepare_branch_input
    from flare23.inference.engine import EngineNetworks
    from flare23.inference.int8 import CALIBRATION_RECORD
    from flare23.roi.box import locate

    windows = int(windows)
    if windows < 1:
        raise Flare23Error(f"--windows must be at least 1, got {windows}")
    overrides = {k.replace("-", "_"): v for k, v in overrides.items()}
    for key in sorted(_NOT_FOR_CALIBRATE & set(overrides)):
        raise Flare23Error(f"--{key}: not an option of flare23 calibrate (it prepares fp32 inputs for int8 on the CPU and writes no segmentation)")
    paths = [scans] if isinstance(scans, (str, os.PathLike)) else list(scans)
    if not paths:
        raise Flare23Error("calibrate needs at least one scan (a NIfTI file, a folder of them or a DICOM series folder)")
    cases = [case for p in paths for case in list_cases(p)]  # a missing or unusable path fails here, before any work
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise Flare23Error(f"{folder}: exists and is not a folder")
    parser = _pipeline(bundles_dir, overrides)
    set_threads(parse_threads(threads) if threads is not None else parser.get_parsed_content("threads"))
    device = torch.device(parser.get_parsed_content("device"))
    network = parser.get_parsed_content("network")
    inferer = parser.get_parsed_content("inferer")
    parser.get_parsed_content("checkpointloader")
    try:
        roi_net = network.wait("roi")
        branches = {"organ": inferer.organ, "tumor": inferer.tumor}
        record = {"format": 1, "windows": windows, "scans": [], "volumes": {n: [] for n in branches},
                  "branches": {n: {"target_spacing": [float(v) for v in b.target_spacing], "patch_size": [int(v) for v in b.patch_size],
                                   **{k: float(getattr(b, k)) for k in ("clip_low", "clip_high", "mean", "std")}}
                               for n, b in branches.items()}}  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        for case in cases:
            array, affine, _meta = read_case(case)
            image = torch.from_numpy(np.ascontiguousarray(array))
            with torch.inference_mode():
                box = locate(roi_net, image, np.asarray(affine, dtype=float), device=device, **inferer.roi_params)
                if box is None:
                    warnings.warn(f"{case.path}: the ROI extractor found no abdomen; not used for calibration", stacklevel=2)
                    continue
                _, _, _, crop_ras, spacing = crop_to_box(image, np.asarray(affine, dtype=float), box)
                record["scans"].append({"case": case.name, "source": str(case.path), "crop_shape": [int(s) for s in crop_ras.shape]})
                for name, branch in branches.items():
                    x, _ = prepare_branch_input(branch, crop_ras, spacing, device)
                    record["volumes"][name].append(write_volume(folder, name, case.name, x[0, 0].cpu().numpy()))
            print(f"{case.name}: crop {tuple(int(s) for s in crop_ras.shape)}", flush=True)
        if not record["scans"]:
            raise Flare23Error(f"{', '.join(str(p) for p in paths)}: no scan with an abdomen to calibrate on")
        write_record(folder, record)
        print(f"wrote {folder / CALIBRATION_RECORD} ({len(record['scans'])} scans)", flush=True)
        if quantize:
            engines = EngineNetworks("openvino", parser.get_parsed_content("engine_cache"), precision="int8", calibration=folder,
                                     branches=branches.values())  # fmt: skip
            for name, branch in branches.items():
                net = network.wait(name)
                t0 = time.perf_counter()
                int8 = engines.network_for(name, branch.patch_size, net, torch.device("cpu"))
                seconds = time.perf_counter() - t0
                agree = label_agreement(net, int8, engines.calibration.windows(name, branch.patch_size)[:4])
                print(f"{name}: int8 network {'made' if int8.converted else 'read from the cache'} in {seconds:.1f} s ({int8.xml}); "
                      f"labels of 4 calibration windows as fp32 on {100 * agree:.2f} % of voxels", flush=True)  # fmt: skip
    finally:
        network.join()
    return folder


def write_volume(folder: Path, name: str, case: str, x: np.ndarray) -> dict:
    """Store one calibration input of the ``name`` model (float16, atomically); its entry of ``calibration.json``."""
    target = Path(folder) / name / f"{case}.npy"
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(x).astype(np.float16))
    return {"file": f"{name}/{target.name}", "sha256": file_sha256(target), "shape": [int(s) for s in np.shape(x)]}


def write_record(folder: Path, record: dict) -> Path:
    """``calibration.json``, written last and atomically: the folder counts once every volume is in."""
    from flare23.inference.int8 import CALIBRATION_RECORD

    with atomic_path(Path(folder) / CALIBRATION_RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return Path(folder) / CALIBRATION_RECORD


def label_agreement(net: torch.nn.Module, engine, windows) -> float:
    """Fraction of voxels of ``windows`` whose arg-max label from ``engine`` equals the one from ``net`` (PyTorch fp32, on the CPU)."""
    same = total = 0
    for w in windows:
        x = torch.from_numpy(w)
        with torch.inference_mode():
            ref = net(x).argmax(1)
        got = engine(x).argmax(1)
        same += int((ref == got).sum())
        total += ref.numel()
    return same / total if total else float("nan")


def calibrate_cli(*scans, out: str | None = None, windows: int = DEFAULT_WINDOWS, threads=None, bundles_dir: str | None = None,
                  quantize: bool = True, **overrides):  # fmt: skip
    """Calibrate int8: ``flare23 calibrate SCAN [SCAN ...] --out DIR [--windows 32] [--threads N] [--id value ...]``.

    SCANs are NIfTI files, folders of them or DICOM series folders (a few scans like the ones you will segment);
    ``--id value`` are pipeline bundle ids, as for ``flare23 segment`` (e.g. ``--organ_ckpt``). Then segment with
    ``flare23 segment -i IN -o OUT --engine openvino --precision int8 --int8_calibration DIR``.

    Args:
        out: the calibration folder (required).
        windows: windows per network for NNCF's statistics (default 32; at the paper's widths about 10 s each on 2 cores).
        threads: CPU threads (default: the pipeline's ``threads`` id).
        bundles_dir: the project's ``bundles/`` folder; default: the one beside the installed package.
        quantize: quantise and cache both networks now (default True).
    """
    if not out:
        raise Flare23Error("calibrate needs --out DIR (flare23 calibrate --help)")
    if not scans:
        raise Flare23Error("calibrate needs at least one SCAN (flare23 calibrate --help)")
    calibrate(list(scans), out, windows=windows, bundles_dir=bundles_dir, threads=threads, quantize=quantize, **overrides)
