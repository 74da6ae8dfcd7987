"""The cascade inferer of the pipeline bundle (METHOD.md section 5) and its I/O transforms.

Per case, :class:`CascadeInferer` does, on one device:

1. ROI stage: stride-subsample the scan (a view, no interpolation), normalise, run the light
   U-Net (:mod:`flare23.roi`), and turn the mask into a crop box with physical margins. An empty
   ROI gives an all-background result and a warning.
2. Crop, and reorient the crop to RAS (a permutation and flips: the fine models were trained on
   ``Orientationd(axcodes="RAS")`` data).
3. Tumor branch, then organ branch: resample the crop on the device to the model's spacing
   (:func:`flare23.resample.resample_image`), CT-normalise with the fingerprint, Gaussian sliding
   window with a softmax per patch (no test-time mirroring; MONAI's windows and weights, run slab by
   slab along the slice axis by :func:`flare23.sliding.sliding_window_slabs`), probabilities
   accumulated in half precision on CUDA. On CUDA the organ branch's preprocessing runs in a thread
   while the tumor branch's windows run.
4. Each finished slab of probabilities goes back to the crop grid on the device at once:
   trilinear interpolation + arg-max (:class:`flare23.resample.StreamingLabels`), identical to the
   whole-volume computation. Only about two windows' depth of probabilities ever exists, so
   memory is bounded by the plane size, not by the scan's length.
5. Ensemble (eq. 5) and post-processing (:mod:`flare23.postprocess`), back to the input's array
   orientation, pasted into a full-size background volume.

Weights of the three networks load in a background thread (:meth:`CascadeNetworks.load_async`)
while the first image is read and subsampled; each stage waits only for its own network. A
checkpoint that fails to load stops the whole run with one :class:`WeightsError` (every case would
fail alike), and the loader thread is always joined before the run ends (:meth:`CascadeNetworks.join`,
called by :class:`CascadeReport` when the run completes or fails): a thread still inside torch at
interpreter exit aborts the process ("terminate called without an active exception").
Per-stage wall times of every case are kept in :attr:`CascadeInferer.timings`.

Precision: ``"auto"`` is fp16 autocast on CUDA, and on CPU bf16 autocast where the CPU has native
bf16 kernels (MEASUREMENTS.md: bf16 halved the network time on such a CPU), else fp32 (emulated
bf16 is several times slower); ``"fp32"`` turns autocast off, ``"bf16"`` forces it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.inferers import Inferer
from monai.transforms import MapTransform

from flare23 import roi as roi_lib
from flare23.config import as_bool
from flare23.efficiency import set_threads  # noqa: F401 - the pipeline's initialize: set_threads(@threads)
from flare23.errors import Flare23Error
from flare23.io import voxel_spacing
from flare23.postprocess import ensemble, postprocess
from flare23.resample import DEFAULT_BLOCK, StreamingLabels, resample_image
from flare23.sliding import sliding_window_slabs
from flare23.training import load_weights

logger = logging.getLogger(__name__)


class WeightsError(Flare23Error):
    """A checkpoint that does not load: fatal for the run, not for one case (every case would fail alike)."""


def _weights_error(exc: BaseException, path) -> WeightsError:
    if isinstance(exc, WeightsError):
        return exc
    text = str(exc).strip()
    message = text if isinstance(exc, Flare23Error) else f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    return WeightsError(message if not path or str(path) in message else f"{path}: {message}")


# --- networks ---------------------------------------------------------------------------------
class CascadeNetworks(torch.nn.Module):
    """The pipeline's ``network_def``: the ROI, organ and tumor networks in one module.

    Its state dict (keys ``roi.*``, ``organ.*``, ``tumor.*``) is the combined checkpoint that
    MONAI Label loads as one model. ``forward`` runs the organ network (the cascade itself is
    the job of :class:`CascadeInferer`).
    """

    PARTS = ("roi", "organ", "tumor")

    def __init__(self, roi: torch.nn.Module, organ: torch.nn.Module, tumor: torch.nn.Module):
        super().__init__()
        self.roi, self.organ, self.tumor = roi, organ, tumor
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
        from flare23.trained import weights_files

        # the same choice the sub-bundles' settings were read from (one rule: flare23.trained.weights_files)
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


def pack_checkpoints(roi_ckpt, organ_ckpt, tumor_ckpt, out_path, networks: CascadeNetworks) -> Path:
    """Write ``{"model": {roi.*, organ.*, tumor.*}, "settings": {"parts": ...}}`` (checked by a strict load) atomically.

    The settings each sub-bundle checkpoint carries (:mod:`flare23.trained`) go along, so that the packed
    file is used as trained too; a part without settings is packed without them.
    """
    from flare23.io import atomic_path
    from flare23.trained import SETTINGS_KEY, read_settings

    parts = {}
    for part, path in zip(CascadeNetworks.PARTS, (roi_ckpt, organ_ckpt, tumor_ckpt)):
        load_weights(getattr(networks, part), path)
        settings = read_settings(path, part)
        if settings is not None:
            parts[part] = settings
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    packed = {"model": {k: v.detach().cpu() for k, v in networks.state_dict().items()}}
    if parts:
        packed[SETTINGS_KEY] = {"parts": parts}
    with atomic_path(out_path) as tmp:
        torch.save(packed, str(tmp))
    return out_path


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


@dataclass
class StageTimer:
    device: torch.device
    times: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 / AMX).

    Without them bf16 autocast is emulated and much slower than fp32 (measured on the AVX2 dev
    machine: a small DynUNet 9x slower), so ``precision="auto"`` then stays in fp32.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _autocast(device: torch.device, precision: str):
    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise Flare23Error(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    if device.type == "cpu" and (precision == "bf16" or (precision == "auto" and cpu_has_fast_bf16())):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class CascadeInferer(Inferer):
    """ROI -> crop -> tumor and organ models -> labels on the crop grid -> ensemble -> full volume.

    Called by MONAI's ``SupervisedEvaluator`` as ``inferer(inputs, network)`` with ``inputs`` a
    MetaTensor ``(1, 1, X, Y, Z)`` in the file's array order (its ``affine`` is the input's) and
    ``network`` a :class:`CascadeNetworks`. Returns the uint8 label map ``(1, 1, X, Y, Z)`` on
    ``out_device`` (CPU by default), in the input's array order and shape.
    """

    def __init__(
        self,
        tumor: Branch,
        organ: Branch,
        roi_params: dict | None = None,
        block: int = DEFAULT_BLOCK,
        precision: str = "auto",
        postprocessing: bool = True,
        postprocess_params: dict | None = None,
        overlap_branches: str | bool = "auto",
        out_device: str | torch.device = "cpu",
    ):
        super().__init__()
        self.tumor, self.organ = tumor, organ
        self.roi_params = dict(roi_params or {})
        self.block = int(block)
        self.precision = precision
        self.postprocessing = as_bool(postprocessing, "postprocess")
        self.postprocess_params = _postprocess_params(postprocess_params)
        self.overlap_branches = overlap_branches
        self.out_device = torch.device(out_device)
        self.timings: list[dict] = []
        self.box_records: list[dict] = []  # RoiBox.to_json with the input's affine, per case
        self.failures: list[str] = []

    # one branch: preprocessing ----------------------------------------------------------------
    @staticmethod
    def _prepare(branch: Branch, crop_ras: torch.Tensor, spacing_ras, device) -> tuple[torch.Tensor, tuple]:
        """The branch's network input: the crop on the model grid (:mod:`flare23.spacing`'s convention, the one
        training and the bundle's own ``inference.json`` use), CT-normalised (:class:`flare23.transforms.CTNormalize`)."""
        from flare23.spacing import target_shape
        from flare23.transforms import CTNormalize

        x = crop_ras.to(device=device, dtype=torch.float32, non_blocking=True)
        shape = tuple(int(s) for s in x.shape)
        target = target_shape(shape, spacing_ras, branch.target_spacing)
        if target != shape:
            x = resample_image(x, target)
        # in place only on a volume of our own: the crop itself (a float32 input already on the model grid)
        # serves the other branch too and must stay as it is
        owned = x.data_ptr() != crop_ras.data_ptr()
        x = CTNormalize(branch.clip_low, branch.clip_high, branch.mean, branch.std, inplace=owned)(x)
        return x[None, None], shape

    def _labels(
        self, branch: Branch, net: torch.nn.Module, x: torch.Tensor, out_shape, device, timer: StageTimer
    ) -> torch.Tensor:
        """Gaussian sliding window on the model grid, streamed slab by slab into labels on the crop grid.

        The windows are MONAI's (:func:`flare23.sliding.sliding_window_slabs`); each finished slab of
        probabilities is turned into labels at once (:class:`flare23.resample.StreamingLabels`), so
        only about two windows' depth of probabilities exists at any time, whatever the scan's
        length. Stage times: ``<name>_network`` (forward passes and softmax), ``<name>_aggregate``
        (Gaussian weighting and sums), ``<name>_resample`` (back to the crop grid with arg-max).
        """
        half = device.type == "cuda" and self.precision != "fp32"
        name = branch.name

        def predictor(patch):
            with timer(f"{name}_network"):
                with _autocast(device, self.precision):
                    logits = net(patch)
                probs = torch.softmax(logits.float(), dim=1)
                return probs.half() if half else probs

        sink = StreamingLabels(x.shape[2:], out_shape, axis=2, block=self.block)
        # windows past the crop are padded with 0 (the fingerprint mean), as training's SpatialPadd and
        # MONAI's validation windows do: instance norm makes every voxel depend on the padding
        slabs = sliding_window_slabs(x, predictor, branch.patch_size, branch.overlap, axis=2, sw_batch_size=branch.sw_batch_size,
                                     cval=0.0, acc_dtype=torch.float16 if half else torch.float32)  # fmt: skip
        keys = (f"{name}_network", f"{name}_resample")
        before = [timer.times.get(k, 0.0) for k in keys]
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _, _, slab in slabs:
                with timer(f"{name}_resample"):
                    sink.add(slab)
                del slab  # not held while the next slab is computed
        # the rest of the loop's time is the Gaussian weighting and sums of the windows
        timed = sum(timer.times.get(k, 0.0) - b for k, b in zip(keys, before))
        timer.times[f"{name}_aggregate"] = timer.times.get(f"{name}_aggregate", 0.0) + max(0.0, time.perf_counter() - t0 - timed)
        return sink.result()

    # the whole cascade --------------------------------------------------------------------------
    def __call__(self, inputs: torch.Tensor, network: CascadeNetworks, *args, **kwargs) -> torch.Tensor:
        """Segment one case; a case that fails is recorded in :attr:`failures` and gives an empty tensor.

        One bad scan must not stop a folder run: the error (one line, naming the file) is logged,
        the batch goes on, and :class:`CascadeReport` makes the run fail at the end.
        """
        if inputs.shape[0] != 1:
            raise ValueError("CascadeInferer expects one case per batch")
        meta = getattr(inputs, "meta", {}) or {}
        source = _first(meta.get("filename_or_obj", "input"))
        error = _first(meta.get("error", ""))
        if error:
            self._fail(source, error)
            return torch.zeros((1, 1, 0, 0, 0), dtype=torch.uint8)
        try:
            return self._cascade(inputs, network)
        except WeightsError:
            raise  # not this case's fault: the run stops with one line
        except Flare23Error as exc:
            self._fail(source, str(exc))
        except Exception as exc:  # noqa: BLE001 - one failing case must not stop the batch
            logger.debug("case %s failed", source, exc_info=True)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self._fail(source, f"{type(exc).__name__}: {first}")
        return torch.zeros((1, 1, 0, 0, 0), dtype=torch.uint8)

    def _fail(self, source: str, message: str) -> None:
        message = message if str(source) in message else f"{source}: {message}"
        self.failures.append(message)
        logger.error(message)
        print(f"flare23: error: {message}", file=sys.stderr, flush=True)

    def _cascade(self, inputs: torch.Tensor, network: CascadeNetworks) -> torch.Tensor:
        affine = np.asarray(getattr(inputs, "affine", torch.eye(4)).detach().cpu().numpy(), dtype=float)
        if affine.ndim == 3:
            affine = affine[0]
        device = next(network.parameters()).device
        timer = StageTimer(device)
        image = inputs[0, 0]
        image = image.as_tensor() if hasattr(image, "as_tensor") else image
        full_shape = tuple(int(s) for s in image.shape)
        out = torch.zeros(full_shape, dtype=torch.uint8, device=self.out_device)

        with torch.inference_mode():
            with timer("roi"):
                roi_net = network.wait("roi")
                box = roi_lib.locate(
                    roi_net, image, affine, device=device, autocast=_autocast(device, self.precision), **self.roi_params
                )
            self.box_records.append(box.to_json(affine) if box is not None else roi_lib.empty_box_json(full_shape, affine))
            if box is None:
                # wait for the networks still loading in the background: a bad checkpoint is then reported, and no
                # loader thread is left running at exit (which aborts the interpreter: "terminate called ...")
                network.wait("tumor")
                network.wait("organ")
                source = _first((getattr(inputs, "meta", {}) or {}).get("filename_or_obj", "input"))
                warnings.warn(f"{source}: the ROI extractor found no abdomen: the output is all background", stacklevel=2)
                self.timings.append(timer.times)
                return out[None, None]
            with timer("crop"):
                crop = image[box.slices]
                crop_affine = affine.copy()
                crop_affine[:3, 3] = affine[:3, :3] @ np.array([s.start for s in box.slices]) + affine[:3, 3]
                ras = roi_lib.ras_affine(crop_affine, crop.shape)
                crop_ras = roi_lib.reorient(crop, crop_affine, ras)
                spacing = tuple(float(v) for v in voxel_spacing(ras))
                crop_shape = tuple(int(s) for s in crop_ras.shape)

            overlap = self.overlap_branches
            if overlap == "auto":
                overlap = device.type == "cuda"
            pool = ThreadPoolExecutor(1) if overlap else None
            try:
                with timer("tumor_preprocess"):
                    x_t, _ = self._prepare(self.tumor, crop_ras, spacing, device)
                organ_future = pool.submit(self._prepare, self.organ, crop_ras, spacing, device) if pool else None
                with timer("tumor_load_wait"):
                    tumor_net = network.wait("tumor")
                lab_t = self._labels(self.tumor, tumor_net, x_t, crop_shape, device, timer)
                del x_t
                with timer("organ_preprocess"):
                    x_o, _ = organ_future.result() if organ_future else self._prepare(self.organ, crop_ras, spacing, device)
            finally:
                if pool:
                    pool.shutdown(wait=True)
            del crop, crop_ras  # both branches have their own resampled copies now
            with timer("organ_load_wait"):
                organ_net = network.wait("organ")
            lab_o = self._labels(self.organ, organ_net, x_o, crop_shape, device, timer)
            del x_o
            with timer("ensemble"):
                labels = ensemble(lab_o, lab_t)
            del lab_o, lab_t  # full-size maps: only the ensemble goes on
            if self.postprocessing:
                with timer("postprocess"):
                    labels = postprocess(labels.cpu().numpy(), **self.postprocess_params)
                    labels = torch.from_numpy(np.ascontiguousarray(labels))
            with timer("paste"):
                labels = roi_lib.reorient(labels.to(self.out_device), ras, crop_affine)
                out[box.slices] = labels.to(torch.uint8)
        self.timings.append(timer.times)
        return out[None, None]


# --- wiring from the sub-bundles ----------------------------------------------------------------
def branch_from_bundle(sub, name: str) -> Branch:
    """A :class:`Branch` from a fine model's bundle (:class:`flare23.bundles.SubBundle`).

    Reads the bundle's own ids of its ``inference.json``: ``target_spacing``, ``patch_size``,
    ``overlap``, ``normalization`` and ``sw_batch_size``. With the pipeline's weights set as the
    sub-bundle's ``ckpt_path``, those are the values its checkpoint was trained with
    (:mod:`flare23.trained`), and its ``trained_check`` refuses an override that contradicts them.
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
    """Keyword arguments of :func:`flare23.roi.locate` from the ROI bundle's inference.json ids (checked as trained)."""
    sub.get("trained_check")
    params = {}
    for key in ("margins_mm", "max_whole_slices", "tile", "pad_multiple", "inplane_stride", "slice_target_mm", "mirror_axes", "clip"):
        if key in sub.parser:
            params[key] = sub.get(key)
    return params


def datalist_from_input(input_path) -> list[dict]:
    """Pipeline datalist: one ``{"image": path, "kind": "nifti"|"dicom", "name": case}`` per input case."""
    from flare23.readers import list_cases

    return [{"image": str(c.path), "kind": c.kind, "name": c.name} for c in list_cases(input_path)]


def datalist_from_split(datalist, split: str = "validation") -> list[dict]:
    """Pipeline datalist from the ``split`` of a MONAI datalist JSON (labels are not read)."""
    from flare23.evaluation import datalist_split
    from flare23.io import case_name

    return [{"image": d["image"], "kind": "nifti", "name": case_name(d["image"])} for d in datalist_split(datalist, split)]


class ReadCased(MapTransform):
    """Read a case (NIfTI or DICOM series) as a MetaTensor ``(1, X, Y, Z)`` in the file's array order.

    Faster than ``LoadImaged`` for this job (nibabel's ``dataobj`` without a float copy,
    MEASUREMENTS.md) and it reads DICOM series with the project's validated reader. The meta data
    carry ``affine``, ``filename_or_obj`` and ``case`` (the output name).
    """

    def __init__(self, keys="image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data):
        from monai.data import MetaTensor

        from flare23.readers import Case, read_case

        d = dict(data)
        for key in self.key_iterator(d):
            path = Path(d[key])
            case = Case(d.get("name") or path.name, path, d.get("kind") or ("dicom" if path.is_dir() else "nifti"))
            try:
                array, affine, _meta = read_case(case)
            except Flare23Error as exc:  # reported by the inferer; the batch goes on
                meta = {"filename_or_obj": str(path), "case": case.name, "error": str(exc)}
                d[key] = MetaTensor(
                    torch.zeros((1, 1, 1, 1), dtype=torch.int16), affine=torch.eye(4, dtype=torch.float64), meta=meta
                )
                continue
            if not np.issubdtype(array.dtype, np.integer):
                array = np.nan_to_num(array.astype(np.float32, copy=False), nan=-1024.0, posinf=3071.0, neginf=-1024.0)
            t = torch.from_numpy(np.ascontiguousarray(array))[None]
            meta = {
                "filename_or_obj": str(path),
                "case": case.name,
                # MONAI's LoadImage keys: MONAI Label writes its answer with ``original_affine``
                "original_affine": np.asarray(affine, dtype=np.float64),
                "spatial_shape": np.asarray(array.shape),
            }
            d[key] = MetaTensor(t, affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)
        return d


class SaveLabeld(MapTransform):
    """Write ``d[key]`` (a label map ``(1, X, Y, Z)``) as uint8 NIfTI ``output_dir/<case>.nii.gz``, atomically.

    Shape and affine are those of ``d[meta_key]`` (the input image). An output path equal to the
    input path is refused: results go next to, never over, the user's files.
    """

    def __init__(self, keys="pred", output_dir: str = "output", meta_key: str = "image", output_postfix: str = ""):
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.meta_key = meta_key
        self.output_postfix = output_postfix
        self.written: list[Path] = []

    def __call__(self, data):
        from flare23.io import ensure_output_dir, save_nifti

        d = dict(data)
        ref = d[self.meta_key]
        if ref.meta.get("error"):
            return d  # a failed case: nothing is written
        affine = np.asarray(ref.affine.detach().cpu().numpy(), dtype=float)
        source = Path(str(ref.meta.get("filename_or_obj", "")))
        name = str(ref.meta.get("case") or source.name)
        for key in self.key_iterator(d):
            labels = d[key]
            labels = labels.as_tensor() if hasattr(labels, "as_tensor") else labels
            labels = labels.detach().cpu().numpy()
            if labels.size == 0:
                continue  # the inferer failed on this case and reported it
            while labels.ndim > 3:
                labels = labels[0]
            if labels.shape != tuple(ref.shape[-3:]):
                raise Flare23Error(f"{source}: result shape {labels.shape} differs from the input's {tuple(ref.shape[-3:])}")
            ensure_output_dir(self.output_dir)
            out = self.output_dir / f"{name}{self.output_postfix}.nii.gz"
            if source.exists() and out.resolve() == source.resolve():
                raise Flare23Error(f"{out}: refusing to write the result over the input; choose another output folder")
            save_nifti(labels.astype(np.uint8, copy=False), affine, out)
            self.written.append(out)
        return d


def _postprocess_params(params: dict | None) -> dict:
    """:func:`flare23.postprocess.postprocess`'s lists and fraction from the pipeline's ids, checked before any case."""
    params = dict(params or {})
    unknown = set(params) - {"keep_largest", "remove_small", "fraction"}
    if unknown:
        raise Flare23Error(f"postprocess_params: unknown key(s) {sorted(unknown)}; expected keep_largest, remove_small, fraction")
    out = {}
    for key in ("keep_largest", "remove_small"):
        if key in params:
            labels = [int(v) for v in params[key]]
            if any(not 1 <= v < 255 for v in labels):
                raise Flare23Error(f"{key}: labels must be foreground ids, got {labels}")
            out[key] = labels
    if "fraction" in params:
        fraction = float(params["fraction"])
        if not 0.0 <= fraction <= 1.0:
            raise Flare23Error(f"small_component_fraction must be in [0, 1], got {fraction}")
        out["fraction"] = fraction
    return out


def _first(value):
    """The first element of a collated meta value (lists of one), or the value itself."""
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _case_of(batch, key: str = "case", default: str = "case") -> str:
    """The case name (or another meta value ``key``) of a (collated or decollated) evaluator batch."""
    item = batch[0] if isinstance(batch, (list, tuple)) else batch
    image = item.get("image") if isinstance(item, dict) else item
    case = getattr(image, "meta", {}).get(key, default)
    return str(case[0] if isinstance(case, (list, tuple)) else case)


class CascadeReport:
    """Evaluator handler: per-case efficiency (wall time, peak memory, memory-time area) and stage times.

    Writes after every case ``output_dir/efficiency.csv`` (:class:`flare23.efficiency.EfficiencyLog`),
    ``output_dir/timings.csv`` (seconds per stage) and ``output_dir/<case>_roi.json``: the case's
    record with ``roi_box`` (:meth:`flare23.roi.RoiBox.to_json` with the input's affine: voxel
    ``start`` inclusive / ``stop`` exclusive, and ``corners_mm``, the 8 outer voxel-edge corners of
    the box in world mm, ``affine @ (index - 0.5 | stop - 0.5)``; ``{"empty": true}`` for an empty
    ROI), ``stage_seconds``, ``total_s``, ``threads`` and ``device``. Logs a median summary at the
    end. When the run ends, completed or failed, the network's background weight loader is joined
    and a running memory monitor stopped.
    """

    def __init__(self, inferer: CascadeInferer, output_dir: str, device=None, interval: float = 0.1):
        self.inferer = inferer
        self.output_dir = Path(output_dir)
        self.device = device
        self.interval = interval
        self.rows: list[dict] = []
        self._monitor = None
        self._n_timings = 0

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._stop)
        engine.add_event_handler(Events.COMPLETED, self._summary)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    def _cleanup(self, engine) -> None:
        mon, self._monitor = self._monitor, None
        if mon is not None and mon._thread is not None:
            mon.__exit__(None, None, None)
        network = getattr(engine, "network", None)
        if hasattr(network, "join"):
            network.join()

    def _failed(self, engine, exc: BaseException) -> None:
        """Events.EXCEPTION_RAISED: clean up, then raise on (ignite swallows it once a handler exists)."""
        self._cleanup(engine)
        raise exc

    def _start(self, engine) -> None:
        from flare23.efficiency import EfficiencyMonitor

        self._monitor = EfficiencyMonitor(device=self.device, interval=self.interval).__enter__()
        self._n_timings = len(self.inferer.timings)

    def _stop(self, engine) -> None:
        from flare23.efficiency import EfficiencyLog

        mon, self._monitor = self._monitor, None
        mon.__exit__(None, None, None)
        if len(self.inferer.timings) == self._n_timings:
            return  # the case failed: the inferer has reported it
        case = _case_of(engine.state.batch)
        EfficiencyLog(self.output_dir / "efficiency.csv").add(case, mon)
        row = {"case": case, **{k: round(v, 4) for k, v in (self.inferer.timings[-1] if self.inferer.timings else {}).items()}}
        row["total_s"] = round(mon.wall_s, 4)
        self.rows.append(row)
        self._write_timings()
        self._write_record(engine, case, row)

    def _write_record(self, engine, case: str, row: dict) -> None:
        from flare23.io import atomic_write_json

        record = {
            "case": case,
            "source": _case_of(engine.state.batch, "filename_or_obj", ""),
            "roi_box": self.inferer.box_records[-1] if self.inferer.box_records else None,
            "stage_seconds": {k: v for k, v in row.items() if k not in ("case", "total_s")},
            "total_s": row["total_s"],
            "threads": torch.get_num_threads(),
            "device": str(self.device) if self.device is not None else None,
        }
        atomic_write_json(self.output_dir / f"{case}_roi.json", record)

    def _write_timings(self) -> None:
        from flare23.io import atomic_write_text

        columns = ["case"] + sorted({k for r in self.rows for k in r if k not in ("case", "total_s")}) + ["total_s"]
        lines = [",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in self.rows]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.output_dir / "timings.csv", "\n".join(lines) + "\n")

    def _summary(self, engine) -> None:
        self._cleanup(engine)
        self._print_medians()
        failures = self.inferer.failures
        if failures:
            n = len(self.rows) + len(failures)
            rest = f"the others were written to {self.output_dir}" if self.rows else "no result was written"
            raise Flare23Error(f"{len(failures)} of {n} case(s) failed (listed above); {rest}")

    def _print_medians(self) -> None:
        if not self.rows:
            return
        keys = [k for k in self.rows[0] if k != "case"]
        med = {k: float(np.median([r.get(k, 0.0) for r in self.rows])) for k in keys}
        text = ", ".join(f"{k} {v:.2f}s" for k, v in med.items())
        logger.info("cascade: %d case(s), median per stage: %s", len(self.rows), text)
        print(f"flare23 pipeline: {len(self.rows)} case(s); median seconds per stage: {text}")
