"""int8 on the CPU (issue 23, item 2): NNCF's post-training quantisation and the calibration folder it reads.

``flare23 calibrate`` (:mod:`flare23.inference.calibrate`) writes the folder from the user's scans;
:class:`CalibrationSet` reads it back (every volume checked against its recorded SHA-256) and draws the
windows that :func:`quantize_int8` calibrates on. :class:`flare23.inference.engine.OpenVinoNetwork` quantises
with them and caches the result like the fp32 conversion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from flare23.errors import Flare23Error
from flare23.io import file_sha256

#: NNCF's settings for int8 (part of the cache key): MIXED = symmetric int8 weights, asymmetric activations (the
#: leaky ReLU outputs are not symmetric about 0), fast bias correction.
INT8_SETTINGS = {"preset": "mixed", "fast_bias_correction": True}
CALIBRATION_RECORD = "calibration.json"


def quantize_int8(model, windows):
    """``model`` (an OpenVINO model) quantised to int8 by NNCF's post-training quantisation on ``windows``."""
    import nncf

    windows = list(windows)
    if not windows:
        raise Flare23Error("int8 calibration: no window with anything but background in the calibration scans")
    nncf.set_log_level(logging.WARNING)  # its INFO lines; the progress bars stay (minutes at the paper's widths)
    return nncf.quantize(model, nncf.Dataset(windows), preset=nncf.QuantizationPreset.MIXED, subset_size=len(windows),
                         fast_bias_correction=INT8_SETTINGS["fast_bias_correction"])  # fmt: skip


class CalibrationSet:
    """A folder written by ``flare23 calibrate`` (:mod:`flare23.inference.calibrate`): calibration inputs for int8.

    ``calibration.json`` records, per fine model (``organ``, ``tumor``), the settings its inputs were made with
    (target spacing and CT normalisation: the sub-bundle's own) and one ``.npy`` per calibration scan: the network's
    input for the whole ROI crop (resampled and normalised, float16), with its SHA-256. Windows are drawn from
    these at quantisation time, so a retrained model (same settings) is quantised again from the same scans.

    A missing or unreadable record, a damaged volume, or a model whose settings differ from those recorded is a
    one-line :class:`Flare23Error` naming the folder: int8 from inputs prepared another way would be silently wrong.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        path = self.folder / CALIBRATION_RECORD
        if not path.is_file():
            raise Flare23Error(f"{self.folder}: not a calibration folder (no {CALIBRATION_RECORD}); make one with "
                               f"`flare23 calibrate SCANS --out {self.folder}`")  # fmt: skip
        raw = path.read_bytes()
        try:
            self.record = json.loads(raw)
            self.count = int(self.record["windows"])
            self.record["branches"], self.record["volumes"]  # noqa: B018 - both must be there
        except (ValueError, KeyError, TypeError) as e:
            raise Flare23Error(f"{path}: not a calibration record ({e}); make it again with flare23 calibrate") from None
        self.digest = hashlib.sha256(raw).hexdigest()

    def check_branch(self, branch) -> None:
        """Refuse a fine model (a :class:`flare23.inference.branches.Branch`) whose inputs are made otherwise than recorded."""
        recorded = self.record["branches"].get(branch.name)
        where = self.folder / CALIBRATION_RECORD
        if recorded is None:
            raise Flare23Error(f"{where}: no calibration for the {branch.name} model; run flare23 calibrate again")
        for key in CALIBRATED_SETTINGS:
            ours, theirs = getattr(branch, key), recorded.get(key)
            same = (theirs is not None and len(list(ours)) == len(theirs) and all(abs(float(a) - float(b)) <= 1e-6 for a, b in zip(ours, theirs))
                    if isinstance(ours, (list, tuple)) else theirs is not None and abs(float(ours) - float(theirs)) <= 1e-6)  # fmt: skip
            if not same:
                raise Flare23Error(f"{where}: calibrated for the {branch.name} model with {key} {theirs}, the model uses {ours}: "
                                   "run flare23 calibrate again with these weights and settings")  # fmt: skip

    def volumes(self, name: str):
        """The calibration inputs of the ``name`` model as float32 arrays, each checked against its recorded SHA-256."""
        import numpy as np

        for item in self.record["volumes"].get(name, []):
            path = self.folder / item["file"]
            if not path.is_file() or file_sha256(path) != item["sha256"]:
                raise Flare23Error(f"{path}: calibration volume missing or damaged (its SHA-256 differs from the record); "
                                   "run flare23 calibrate again")  # fmt: skip
            yield np.load(path).astype(np.float32)

    def windows(self, name: str, window: Sequence[int], in_channels: int = 1) -> list:
        """``count`` windows ``(1, in_channels, *window)`` drawn evenly from all sliding-window positions of the ``name``
        model's calibration inputs (overlap 0.5, padding 0 as the cascade pads), skipping windows of one value (air)."""
        import numpy as np
        from monai.data.utils import dense_patch_slices

        from flare23.inference.sliding import scan_interval, window_padding

        window = tuple(int(w) for w in window)
        found = []
        for volume in self.volumes(name):
            volume = np.pad(volume, list(zip(*window_padding(volume.shape, window))))  # as the cascade pads
            for sl in dense_patch_slices(volume.shape, window, scan_interval(volume.shape, window, 0.5)):
                patch = volume[tuple(sl)]
                if float(patch.max()) > float(patch.min()):
                    found.append(patch)
        if not found:
            return []
        picks = sorted(set(np.linspace(0, len(found) - 1, min(self.count, len(found))).round().astype(int).tolist()))
        shape = (1, in_channels, *window)
        return [np.array(np.broadcast_to(found[i], shape), dtype=np.float32) for i in picks]  # writable copies


#: The settings of a fine model that make its inputs (what ``flare23 calibrate`` stores): resampling and normalisation.
CALIBRATED_SETTINGS = ("target_spacing", "clip_low", "clip_high", "mean", "std")
