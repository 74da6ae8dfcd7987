"""The cascade's networks and branches, read from each sub-bundle's own configuration."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flare23.config import as_bool
from flare23.errors import Flare23Error
from flare23.inference.weights import PARTS, _weights_error
from flare23.training.checkpoints import accept_trained_state, load_weights


# --- networks ---------------------------------------------------------------------------------
class CascadeNetworks(torch.nn.Module):
    """The pipeline's ``network_def``: the ROI, organ and tumor networks in one module.

    Its state dict (keys ``roi.*``, ``organ.*``, ``tumor.*``) is the combined checkpoint that
    MONAI Label loads as one model; like each part it takes a training's checkpoint as written
    (:func:`flare23.training.checkpoints.accept_trained_state`: a packed ``model.pt`` whole, the
    fine models' deep-supervision heads dropped by name, every other key strict).

    ``forward`` is the organ network, and it is what the bundle's ``network_data_format`` describes
    (a normalised CT patch in, 15 class scores out): the organ model decides 13 of the pipeline's 15
    labels, and a module's forward has to be one network for MONAI's checks (``verify_net_in_out``,
    TorchScript export). The cascade itself (HU in, one uint8 label map out, ``post_processed_outputs``
    in the metadata) is the job of :class:`CascadeInferer`, which calls each part through :meth:`wait`.
    """

    PARTS = PARTS

    def __init__(self, roi: torch.nn.Module, organ: torch.nn.Module, tumor: torch.nn.Module):
        super().__init__()
        self.roi, self.organ, self.tumor = roi, organ, tumor
        accept_trained_state(self)
        self._ready = {p: threading.Event() for p in self.PARTS}
        for event in self._ready.values():
            event.set()
        self._errors: dict[str, BaseException] = {}
        self._thread: threading.Thread | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.organ(x)

    def __getstate__(self):
        """Copyable and picklable (MONAI Label deep-copies a bundle's network for each device).

        The ``threading.Event`` objects hold locks, which cannot be copied: the copy is taken once
        every part has finished loading and gets fresh, set events.
        """
        for event in self._ready.values():
            event.wait()
        state = self.__dict__.copy()
        state.pop("_ready", None)
        state["_thread"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._thread = None
        self._ready = {p: threading.Event() for p in self.PARTS}
        for event in self._ready.values():
            event.set()

    def load_async(self, roi_ckpt=None, organ_ckpt=None, tumor_ckpt=None, combined_ckpt=None, enabled: bool = True):
        """Load weights in a background thread (ROI first); stages wait with :meth:`wait`.

        The three sub-bundle checkpoints are used when they all exist; otherwise ``combined_ckpt``
        (a packed pipeline ``model.pt``, see :func:`pack_checkpoints`). ``enabled=False`` keeps
        random weights and warns (smoke tests, speed measurements). The thread is not a daemon (the
        interpreter waits for it at exit) and is kept for :meth:`join`.
        """
        self.join()  # a previous load: never two loaders on one module
        if not as_bool(enabled, "load_pretrain"):
            warnings.warn("load_pretrain is false: the pipeline runs with RANDOM weights", stacklevel=2)
            return None
        for event in self._ready.values():
            event.clear()
        self._errors.clear()
        from flare23.inference.weights import weights_files

        # the same choice the sub-bundles' settings were read from (one rule: flare23.inference.weights.weights_files)
        paths = weights_files(roi_ckpt, organ_ckpt, tumor_ckpt, combined_ckpt)
        use_combined = bool(combined_ckpt) and set(paths.values()) == {str(combined_ckpt)}

        def work():
            if use_combined:
                try:
                    load_weights(self, combined_ckpt, key=None)
                except BaseException as exc:  # noqa: BLE001 - re-raised in wait()
                    for p in self.PARTS:
                        self._errors[p] = _weights_error(exc, combined_ckpt)
                for p in self.PARTS:
                    self._ready[p].set()
                return
            for part in self.PARTS:
                try:
                    if not paths[part]:
                        raise Flare23Error(f"no checkpoint given for the {part} network")
                    load_weights(getattr(self, part), paths[part])
                except BaseException as exc:  # noqa: BLE001 - re-raised in wait()
                    self._errors[part] = _weights_error(exc, paths[part])
                finally:
                    self._ready[part].set()

        self._thread = threading.Thread(target=work, name="flare23-weights", daemon=False)
        self._thread.start()
        return self._thread

    def wait(self, part: str) -> torch.nn.Module:
        """The network ``part`` once its weights are in; a :class:`WeightsError` if they failed to load."""
        self._ready[part].wait()
        if part in self._errors:
            raise self._errors[part]
        return getattr(self, part)

    def join(self, timeout: float | None = None) -> None:
        """Wait until the background loader (if any) has finished; errors stay for :meth:`wait`."""
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    close = join


# --- the cascade ------------------------------------------------------------------------------
@dataclass
class Branch:
    """What the cascade needs of one fine model (read from its bundle's inference.json)."""

    name: str
    target_spacing: Sequence[float]  # RAS (x, y, z) mm
    patch_size: Sequence[int]
    overlap: float
    clip_low: float
    clip_high: float
    mean: float
    std: float
    sw_batch_size: int = 1


# --- wiring from the sub-bundles ----------------------------------------------------------------
def branch_from_bundle(sub, name: str) -> Branch:
    """A :class:`Branch` from a fine model's bundle (:class:`flare23.bundles.SubBundle`).

    Reads the bundle's own ids of its ``inference.json``: ``target_spacing``, ``patch_size``,
    ``overlap``, ``normalization`` and ``sw_batch_size``. With the pipeline's weights set as the
    sub-bundle's ``ckpt_path``, those are the values its checkpoint was trained with
    (:mod:`flare23.models.trained`), and its ``trained_check`` refuses an override that contradicts them.
    ``name`` is ``"organ"`` or ``"tumor"``.
    """
    sub.get("trained_check")
    norm = sub.get("normalization")
    return Branch(
        name=name,
        target_spacing=[float(v) for v in sub.get("target_spacing")],
        patch_size=[int(v) for v in sub.get("patch_size")],
        overlap=float(sub.get("overlap")),
        sw_batch_size=int(sub.get("sw_batch_size", default=1)),
        **{k: float(norm[k]) for k in ("clip_low", "clip_high", "mean", "std")},
    )


def roi_params_from_bundle(sub) -> dict:
    """Keyword arguments of :func:`flare23.roi.box.locate` from the ROI bundle's inference.json ids (checked as trained)."""
    sub.get("trained_check")
    params = {}
    for key in ("margins_mm", "max_whole_slices", "tile", "pad_multiple", "inplane_stride", "slice_target_mm", "mirror_axes", "clip"):
        if key in sub.parser:
            params[key] = sub.get(key)
    return params
