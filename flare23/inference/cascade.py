"""The cascade inferer of the pipeline bundle (METHOD.md section 5) and its I/O transforms.

Per case, :class:`CascadeInferer` does, on one device:

1. ROI stage: stride-subsample the scan (a view, no interpolation), normalise, run the light
   U-Net (:mod:`flare23.roi`), and turn the mask into a crop box with physical margins. An empty
   ROI gives an all-background result and a warning.
2. Crop, and reorient the crop to RAS (a permutation and flips: the fine models were trained on
   ``Orientationd(axcodes="RAS")`` data).
3. Organ branch, then tumor branch: resample the crop on the device to the model's spacing
   (:func:`flare23.data.resample.resample_image`), CT-normalise with the fingerprint, Gaussian sliding
   window with a softmax per patch (no test-time mirroring; MONAI's windows and weights, run slab by
   slab along the slice axis by :func:`flare23.inference.sliding.sliding_window_slabs`), probabilities
   accumulated in half precision on CUDA. On CUDA the tumor branch's preprocessing runs in a thread
   while the organ branch's windows run. Optionally (:mod:`flare23.inference.skipping`) windows that
   hold only air are not run (``skip_air_windows``), and the tumor model runs only near the organ
   model's tumor-host organs and tumor (``tumor_windows="hosts"``): a skipped window counts as
   certain background. Windows run and skipped per case and branch are kept in
   :attr:`CascadeInferer.window_counts`.
4. Each finished slab of probabilities goes back to the crop grid on the device at once:
   trilinear interpolation + arg-max (:class:`flare23.data.resample.StreamingLabels`), identical to the
   whole-volume computation. Only about two windows' depth of probabilities ever exists, so
   memory is bounded by the plane size, not by the scan's length.
5. Ensemble (eq. 5) and post-processing (:mod:`flare23.inference.postprocess`), back to the input's array
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
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.inferers import Inferer

from flare23.config import as_bool
from flare23.constants import BACKGROUND, NUM_CLASSES
from flare23.data.grids import reorient
from flare23.data.resample import DEFAULT_BLOCK, StreamingLabels, resample_image
from flare23.errors import Flare23Error, case_error
from flare23.inference.branches import Branch, CascadeNetworks
from flare23.inference.engine import EngineNetworks
from flare23.inference.postprocess import ensemble, postprocess
from flare23.inference.skipping import (
    WindowCounter,
    body_mask,
    check_margin,
    check_tumor_windows,
    combine,
    host_mask,
    margin_voxels,
    window_plan,
)
from flare23.inference.sliding import sliding_window_slabs
from flare23.inference.weights import WeightsError
from flare23.io import voxel_spacing
from flare23.roi.box import empty_box_json, locate
from flare23.roi.geometry import ras_affine

logger = logging.getLogger(__name__)


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


#: ``precision`` values: autocast choices, and ``int8`` (the organ and tumor networks quantised by NNCF, OpenVINO engine).
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")


def _autocast(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise Flare23Error(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision in ("fp32", "int8"):  # int8: the engine runs quantised networks, PyTorch (the ROI) runs fp32
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    if device.type == "cpu" and (precision == "bf16" or (precision == "auto" and cpu_has_fast_bf16())):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _postprocess_params(params: dict | None) -> dict:
    """:func:`flare23.inference.postprocess.postprocess`'s lists and fraction from the pipeline's ids, checked before any case."""
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




#: What a skipped window answers: certain background, over the models' classes.
_BACKGROUND = tuple(1.0 if c == BACKGROUND else 0.0 for c in range(NUM_CLASSES))


def _first(value):
    """The first element of a collated meta value (lists of one), or the value itself."""
    return value[0] if isinstance(value, (list, tuple)) and value else value



def crop_to_box(image: torch.Tensor, affine: np.ndarray, box):
    """The ROI box's crop of ``image`` and its crop in RAS order (what the fine models were trained on).

    Returns ``(crop, crop_affine, ras, crop_ras, spacing)``: the crop in the file's array order with its
    affine, the RAS affine, the crop reoriented to it, and its voxel spacing in mm (RAS order).
    """
    crop = image[box.slices]
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ np.array([s.start for s in box.slices]) + affine[:3, 3]
    ras = ras_affine(crop_affine, crop.shape)
    crop_ras = reorient(crop, crop_affine, ras)
    spacing = tuple(float(v) for v in voxel_spacing(ras))
    return crop, crop_affine, ras, crop_ras, spacing


def _model_shape(branch: Branch, crop_shape, spacing_ras) -> tuple[int, ...]:
    """The shape of the branch's model grid for a crop (what :func:`prepare_branch_input` resamples to)."""
    from flare23.data.spacing import target_shape

    return tuple(int(v) for v in target_shape(crop_shape, spacing_ras, branch.target_spacing))


def prepare_branch_input(branch: Branch, crop_ras: torch.Tensor, spacing_ras, device) -> tuple[torch.Tensor, tuple]:
    """The branch's network input: the crop on the model grid (:mod:`flare23.data.spacing`'s convention, the one
    training and the bundle's own ``inference.json`` use), CT-normalised (:class:`flare23.models.transforms.CTNormalize`)."""
    from flare23.data.spacing import target_shape
    from flare23.models.transforms import CTNormalize

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



class CascadeInferer(Inferer):
    """ROI -> crop -> tumor and organ models -> labels on the crop grid -> ensemble -> full volume.

    Called by MONAI's ``SupervisedEvaluator`` as ``inferer(inputs, network)`` with ``inputs`` a
    MetaTensor ``(1, 1, X, Y, Z)`` in the file's array order (its ``affine`` is the input's) and
    ``network`` a :class:`CascadeNetworks`. Returns the uint8 label map ``(1, 1, X, Y, Z)`` on
    ``out_device`` (CPU by default), in the input's array order and shape.

    A case that cannot be segmented (unreadable input, a failure inside the cascade) raises
    :class:`CaseError`, one line naming the file and the problem, unless :attr:`collect_failures`
    is set: then it is logged, recorded in :attr:`failures` and answered with an empty tensor, so
    that a folder run goes on. :class:`flare23.inference.cases.CascadeReport` sets it when it is
    attached to the run (it fails the run at the end, listing the failed cases); a caller without
    such a report (MONAI Label, which runs only the bundle's transforms and inferer) gets the
    error at once instead of an empty result.
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
        engine: str = "torch",
        engine_cache: str | None = None,
        int8_calibration: str | None = None,
        skip_air_windows: bool = False,
        tumor_windows: str = "all",
        tumor_host_margin_mm: float = 20.0,
    ):
        super().__init__()
        if precision not in PRECISIONS:
            raise Flare23Error(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        # the fine networks' PyTorch weights are freed once compiled: the cascade runs nothing else with them
        self._engines = EngineNetworks(engine, engine_cache, precision=precision, calibration=int8_calibration,
                                       branches=(tumor, organ), release_torch=True)  # fmt: skip
        self.tumor, self.organ = tumor, organ
        self.roi_params = dict(roi_params or {})
        self.block = int(block)
        self.precision = precision
        self.postprocessing = as_bool(postprocessing, "postprocess")
        self.postprocess_params = _postprocess_params(postprocess_params)
        self.overlap_branches = overlap_branches
        self.out_device = torch.device(out_device)
        self.skip_air_windows = as_bool(skip_air_windows, "skip_air_windows")
        self.tumor_windows = check_tumor_windows(tumor_windows)
        self.tumor_host_margin_mm = check_margin(tumor_host_margin_mm)
        self.timings: list[dict] = []
        # per case, aligned with timings: <branch>_windows_run / <branch>_windows_skipped (counts, not seconds,
        # so not in the stage times that timings.csv and the run's summary print as seconds)
        self.window_counts: list[dict] = []
        self.box_records: list[dict] = []  # RoiBox.to_json with the input's affine, per case
        self.failures: list[str] = []
        self.collect_failures = False

    # one branch ---------------------------------------------------------------------------------
    def _network(self, branch: Branch, net: torch.nn.Module, device, timer: StageTimer):
        """What runs ``branch``'s windows: ``net`` itself or its OpenVINO compilation (made once, then reused)."""
        mixed = not isinstance(_autocast(device, self.precision), contextlib.nullcontext)
        return self._engines.network_for(branch.name, branch.patch_size, net, device, autocast=mixed, timer=timer)

    def _labels(
        self,
        branch: Branch,
        net: torch.nn.Module,
        x: torch.Tensor,
        out_shape,
        device,
        timer: StageTimer,
        windows: WindowCounter | None = None,
    ) -> torch.Tensor:
        """Gaussian sliding window on the model grid, streamed slab by slab into labels on the crop grid.

        The windows are MONAI's (:func:`flare23.inference.sliding.sliding_window_slabs`); each finished slab of
        probabilities is turned into labels at once (:class:`flare23.data.resample.StreamingLabels`), so
        only about two windows' depth of probabilities exists at any time, whatever the scan's
        length. Stage times: ``<name>_network`` (forward passes and softmax), ``<name>_aggregate``
        (Gaussian weighting and sums), ``<name>_resample`` (back to the crop grid with arg-max).
        ``windows`` (:class:`flare23.inference.skipping.WindowCounter`) says which windows run and counts them;
        a skipped one counts as certain background.
        """
        half = device.type == "cuda" and self.precision != "fp32"
        name = branch.name
        run = self._network(branch, net, device, timer)

        def predictor(patch):
            with timer(f"{name}_network"):
                with _autocast(device, self.precision):
                    logits = run(patch).float()
                # in place: the logits are ours alone (the forward pass's output, its fp32 copy, or OpenVINO's copied
                # output), and a second window-sized buffer (110 MB for an organ window) would add to the peak
                probs = torch.softmax(logits, dim=1, out=logits)
                return probs.half() if half else probs

        sink = StreamingLabels(x.shape[2:], out_shape, axis=2, block=self.block)
        # windows past the crop are padded with 0 (the fingerprint mean), as training's SpatialPadd and
        # MONAI's validation windows do: instance norm makes every voxel depend on the padding
        slabs = sliding_window_slabs(x, predictor, branch.patch_size, branch.overlap, axis=2, sw_batch_size=branch.sw_batch_size,
                                     cval=0.0, acc_dtype=torch.float16 if half else torch.float32, run_window=windows,
                                     skip_probs=_BACKGROUND)  # fmt: skip
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
        release = getattr(run, "release_memory", None)  # an OpenVINO network's buffers: not held while the other branch runs
        if release is not None:
            release()
        return sink.result()

    # the whole cascade --------------------------------------------------------------------------
    def __call__(self, inputs: torch.Tensor, network: CascadeNetworks, *args, **kwargs) -> torch.Tensor:
        """Segment one case; a case that fails raises :class:`CaseError`, or, with :attr:`collect_failures`, is
        recorded in :attr:`failures` and gives an empty tensor.

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
            self._fail(source, str(exc), exc)
        except Exception as exc:  # noqa: BLE001 - one failing case must not stop the batch
            logger.debug("case %s failed", source, exc_info=True)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self._fail(source, f"{type(exc).__name__}: {first}", exc, status=500)
        return torch.zeros((1, 1, 0, 0, 0), dtype=torch.uint8)

    def _fail(self, source: str, message: str, cause: BaseException | None = None, status: int = 422) -> None:
        """Log the failed case (one line naming ``source``); raise it, or record it when :attr:`collect_failures`.

        ``status``: the HTTP status of the raised error inside a web server (:func:`case_error`): 422 for an
        input that cannot be segmented, 500 for an unexpected failure of the cascade itself.
        """
        message = message if str(source) in message else f"{source}: {message}"
        logger.error(message)
        if not self.collect_failures:
            raise case_error(message, status) from cause
        self.failures.append(message)
        print(f"flare23: error: {message}", file=sys.stderr, flush=True)

    def _count_windows(self, counts: dict) -> None:
        """Record the case's windows run and skipped per branch (:attr:`window_counts`), logged when some were skipped."""
        record = {}
        for part in ("organ", "tumor"):
            record[f"{part}_windows_run"] = counts[part].run
            record[f"{part}_windows_skipped"] = counts[part].skipped
        self.window_counts.append(record)
        if record["organ_windows_skipped"] or record["tumor_windows_skipped"]:
            logger.info("windows run / skipped: organ %d / %d, tumor %d / %d", *record.values())

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
                box = locate(
                    roi_net, image, affine, device=device, autocast=_autocast(device, self.precision), **self.roi_params
                )
            self.box_records.append(box.to_json(affine) if box is not None else empty_box_json(full_shape, affine))
            if box is None:
                # wait for the networks still loading in the background: a bad checkpoint is then reported, and no
                # loader thread is left running at exit (which aborts the interpreter: "terminate called ...")
                network.wait("tumor")
                network.wait("organ")
                source = _first((getattr(inputs, "meta", {}) or {}).get("filename_or_obj", "input"))
                warnings.warn(f"{source}: the ROI extractor found no abdomen: the output is all background", stacklevel=2)
                self._count_windows({"organ": WindowCounter(), "tumor": WindowCounter()})
                self.timings.append(timer.times)
                return out[None, None]
            with timer("crop"):
                crop, crop_affine, ras, crop_ras, spacing = crop_to_box(image, affine, box)
                crop_shape = tuple(int(s) for s in crop_ras.shape)

            counts = {"organ": WindowCounter(), "tumor": WindowCounter()}
            if self.skip_air_windows:
                with timer("window_plan"):
                    body = body_mask(crop_ras)
                    for part, branch in (("organ", self.organ), ("tumor", self.tumor)):
                        counts[part] = WindowCounter(window_plan(body, _model_shape(branch, crop_shape, spacing),
                                                                 branch.patch_size, branch.overlap))  # fmt: skip
                    del body

            overlap = self.overlap_branches
            if overlap == "auto":
                overlap = device.type == "cuda"
            pool = ThreadPoolExecutor(1) if overlap else None
            try:
                with timer("organ_preprocess"):
                    x_o, _ = prepare_branch_input(self.organ, crop_ras, spacing, device)
                tumor_future = pool.submit(prepare_branch_input, self.tumor, crop_ras, spacing, device) if pool else None
                with timer("organ_load_wait"):
                    organ_net = network.wait("organ")
                if self._engines.compiles(device):
                    # both compiled before the organ branch's first window: their PyTorch weights (125 MB each at the
                    # paper's widths) are freed before its peak, not the tumor's only after it
                    self._network(self.organ, organ_net, device, timer)
                    with timer("tumor_load_wait"):
                        tumor_net = network.wait("tumor")
                    self._network(self.tumor, tumor_net, device, timer)
                lab_o = self._labels(self.organ, organ_net, x_o, crop_shape, device, timer, counts["organ"])
                del x_o
                with timer("tumor_preprocess"):
                    x_t, _ = tumor_future.result() if tumor_future else prepare_branch_input(self.tumor, crop_ras, spacing, device)
            finally:
                if pool:
                    pool.shutdown(wait=True)
            del crop, crop_ras  # both branches have their own resampled copies now
            if self.tumor_windows == "hosts":
                with timer("window_plan"):
                    hosts = window_plan(host_mask(lab_o), tuple(int(v) for v in x_t.shape[2:]), self.tumor.patch_size,
                                        self.tumor.overlap, grow=margin_voxels(self.tumor_host_margin_mm, spacing))  # fmt: skip
                    counts["tumor"] = WindowCounter(combine(counts["tumor"].plan, hosts))
            with timer("tumor_load_wait"):
                tumor_net = network.wait("tumor")
            lab_t = self._labels(self.tumor, tumor_net, x_t, crop_shape, device, timer, counts["tumor"])
            del x_t
            self._count_windows(counts)
            with timer("ensemble"):
                labels = ensemble(lab_o, lab_t)
            del lab_o, lab_t  # full-size maps: only the ensemble goes on
            if self.postprocessing:
                with timer("postprocess"):
                    labels = postprocess(labels.cpu().numpy(), **self.postprocess_params)
                    labels = torch.from_numpy(np.ascontiguousarray(labels))
            with timer("paste"):
                labels = reorient(labels.to(self.out_device), ras, crop_affine)
                out[box.slices] = labels.to(torch.uint8)
        self.timings.append(timer.times)
        return out[None, None]
