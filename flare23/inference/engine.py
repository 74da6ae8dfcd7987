"""The engine that runs the cascade's networks: PyTorch eager, or OpenVINO on a CPU (issue 23, item 1).

At the paper's widths the three networks are 97 % of the pipeline's CPU time, and PyTorch eager is
not the fastest way to run them there: OpenVINO's CPU plugin ran one organ window 1.62x and one
tumor window 1.95x faster on this project's 2-core AVX2 machine (issue 23's table, one thread).
Everything around the forward pass (MONAI's windows and Gaussian weights, the streaming of slabs,
resampling back, post-processing) stays as it is: :class:`OpenVinoNetwork` is a drop-in callable for
the network, ``(n, 1, *window)`` torch tensor in, ``(n, C, *window)`` logits out.

Engines: ``torch``, ``openvino``, ``auto`` (OpenVINO on a CPU, PyTorch on CUDA: OpenVINO's CPU
plugin is what this module targets). :func:`resolve_engine` refuses ``openvino`` on a CUDA device in
one line.

Conversion happens once per network and is cached. The cache key is a SHA-256 of the network's
weights (names, shapes, dtypes and bytes of its ``state_dict``), of its structure (its class and
``repr``: layer types and settings that no weight shows, such as an activation's slope), the window
size, the precision and the OpenVINO version, so a retrained checkpoint, another architecture with the
same weights, another window or an OpenVINO upgrade converts again; the cache holds ``<name>-<key>.xml`` / ``.bin`` and a ``.json`` record with the key's parts and
the SHA-256 of both files. A record that does not match or a file whose hash differs (a damaged or
truncated cache) is rebuilt with a warning, never trusted. Cache files are written to temporary
names and renamed, so an interrupted conversion leaves nothing that looks complete. The cache lives
beside the checkpoint (``<checkpoint folder>/.openvino``) where that folder is writable, else under
``$XDG_CACHE_HOME/flare23/openvino`` (``~/.cache/flare23/openvino`` where it is not set).

The batch dimension is dynamic (``sw_batch_size`` and a smaller last batch use the same model); the
window is static, which is what lets OpenVINO pick its fastest kernels. The inference precision is the
run's (``inference_precision``): ``f32`` where the run is fp32 (forced: no silent bf16 on CPUs that have
it), so the logits match PyTorch's to float32 rounding (``tests/test_engine.py``), and ``bf16`` where the
run's ``precision`` makes PyTorch autocast to bf16 on the CPU (``bf16``, or ``auto`` on a CPU with native
bf16 kernels): the same precision PyTorch would use, 2.0x (tumor) and 1.6x (organ) faster per window than
PyTorch's bf16 autocast at the paper's widths on an AVX-512-BF16 EPYC (``bench/README.md``). The cached
model is the fp32 conversion either way; the precision is chosen when it is compiled.

OpenVINO keeps a compiled network's intermediate buffers after an inference (1.5 GB for the organ
network's window at the paper's widths, fp32): :meth:`OpenVinoNetwork.release_memory` hands them back,
and the cascade calls it when a branch's windows are done, so the organ and tumor networks' buffers
are never held at once.

int8 (issue 23, item 2; ``precision="int8"``): the converted model quantised by NNCF's post-training
quantisation (:func:`flare23.inference.int8.quantize_int8`) on windows drawn from a
:class:`flare23.inference.int8.CalibrationSet`, the folder that
``flare23 calibrate`` (:mod:`flare23.inference.calibrate`) writes from the user's scans. It is cached like
the fp32 model, its key also holding NNCF's version, its settings and the calibration record's SHA-256.
A calibration whose inputs were made with another spacing or normalisation than the model's is refused
in one line (:meth:`CalibrationSet.check_branch`), as is int8 with the PyTorch engine, on CUDA, or without
a calibration (:func:`check_engine`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch

from flare23.errors import Flare23Error
from flare23.inference.int8 import INT8_SETTINGS, CalibrationSet, quantize_int8
from flare23.io import atomic_path, file_sha256

logger = logging.getLogger(__name__)

ENGINES = ("torch", "openvino", "auto")
#: What OpenVINO runs: fp32 (logits of PyTorch to float32 rounding) or int8 (NNCF post-training quantisation).
ENGINE_PRECISIONS = ("fp32", "int8")
#: OpenVINO's ``INFERENCE_PRECISION_HINT`` values used: ``f32``, or ``bf16`` where the run autocasts to bf16 on the CPU.
INFERENCE_PRECISIONS = ("f32", "bf16")
CACHE_FOLDER = ".openvino"
USER_CACHE = "flare23/openvino"  # under $XDG_CACHE_HOME, else ~/.cache


def resolve_engine(engine: str, device) -> str:
    """``torch`` or ``openvino`` for ``engine`` on ``device`` (``auto``: OpenVINO on a CPU, PyTorch on CUDA)."""
    if engine not in ENGINES:
        raise Flare23Error(f"engine {engine!r} is not one of: {', '.join(ENGINES)}")
    kind = torch.device(device).type
    if engine == "auto":
        return "openvino" if kind == "cpu" else "torch"
    if engine == "openvino" and kind != "cpu":
        raise Flare23Error(f"engine openvino runs on the CPU only, the device is {kind}: use --engine torch or auto")
    return engine


def check_engine(engine: str, precision: str, device, calibration: str | os.PathLike | None = None) -> str:
    """The engine that runs, checked against ``precision`` before any case: ``int8`` needs OpenVINO on a CPU and a calibration.

    One line per mistake: ``int8`` with ``engine=torch``, on a CUDA device, or without ``int8_calibration``.
    """
    resolved = resolve_engine(engine, device)
    if precision == "int8":
        if resolved != "openvino":
            kind = torch.device(device).type
            where = f"the device is {kind}" if kind != "cpu" else f"engine is {engine}"
            raise Flare23Error(f"precision int8 runs on the OpenVINO engine on a CPU, but {where}: use --engine openvino (or auto) on the CPU, "
                               "or another precision")  # fmt: skip
        if not calibration:
            raise Flare23Error("precision int8 needs --int8_calibration DIR, a folder made by `flare23 calibrate SCANS --out DIR`")
    return resolved


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of the module's ``state_dict``: every name, shape, dtype and byte, in order."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def structure_digest(module: torch.nn.Module) -> str:
    """SHA-256 of what ``module`` computes besides its weights: its class and its modules' ``repr`` (layer types, kernels,
    strides, activation slopes, norms).

    A class that :data:`flare23.models.spec.SAME_NETWORK_AS` maps to another (the same modules and inference output,
    other training outputs) counts as that class: the checkpoint's recorded ``NativeHeadsDynUNet`` and the
    ``DynUNet`` that a run with the same ``network_def`` overrides builds share one conversion.
    """
    from flare23.models.spec import SAME_NETWORK_AS

    cls = f"{type(module).__module__}.{type(module).__qualname__}"
    text = repr(module)
    name = module._get_name()
    body = text[len(name) :] if text.startswith(name) else text
    return hashlib.sha256(f"{SAME_NETWORK_AS.get(cls, cls)}\n{body}".encode()).hexdigest()


#: each module's OpenVINO compilations, by (name, window, inference precision, calibration digest)
_COMPILATIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: set on a module whose weights :func:`release_weights` freed
RELEASED = "_flare23_weights_released"


def release_weights(module: torch.nn.Module) -> None:
    """Free ``module``'s parameters and buffers once OpenVINO holds its own copy of them (the cascade's fine networks).

    At the paper's widths each fine network is 125 MB of float32 that nothing reads after its compilation;
    freed, the organ branch's peak is that much lower. The module is unusable afterwards, loudly: a
    forward pass fails on the empty weights, and :class:`EngineNetworks` refuses to compile it again
    (its cache key would be the digest of nothing).
    """
    with torch.no_grad():
        for p in module.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        for m in module.modules():
            for key, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[key] = torch.empty(0, dtype=b.dtype, device=b.device)
    setattr(module, RELEASED, True)


def cache_dir_for(checkpoint: str | os.PathLike | None) -> Path:
    """``<checkpoint folder>/.openvino`` when that folder is writable, else the user's cache folder
    (``$XDG_CACHE_HOME/flare23/openvino``, ``~/.cache/flare23/openvino`` where it is not set)."""
    if checkpoint:
        folder = Path(checkpoint).expanduser().resolve().parent
        if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK):
            return folder / CACHE_FOLDER
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / USER_CACHE


class OpenVinoNetwork:
    """``module`` compiled by OpenVINO for windows of ``window`` voxels, behind the same call as the module.

    Args:
        module: the loaded network (eval mode is set; its weights are not changed).
        window: the sliding window's size (three ints; the network input is ``(n, 1, *window)``).
        cache_dir: folder of the converted models (:func:`cache_dir_for`).
        name: a prefix for the cache files (``organ``, ``tumor``, ``roi``).
        threads: CPU threads for OpenVINO (default: ``torch.get_num_threads()``, what ``--threads`` set).
        in_channels: input channels (1 for CT).

    ``converted`` says whether this instance converted the network (False: read from the cache);
    ``convert_seconds`` is the time spent converting or reading the cache.
    """

    def __init__(self, module: torch.nn.Module, window: Sequence[int], cache_dir, name: str = "network",
                 threads: int | None = None, in_channels: int = 1, precision: str = "fp32",
                 calibration: CalibrationSet | None = None, inference_precision: str = "f32"):  # fmt: skip
        import openvino as ov

        t0 = time.perf_counter()
        if precision not in ENGINE_PRECISIONS:
            raise Flare23Error(f"engine precision must be one of {', '.join(ENGINE_PRECISIONS)}, got {precision!r}")
        if inference_precision not in INFERENCE_PRECISIONS:
            raise Flare23Error(f"OpenVINO inference precision must be one of {', '.join(INFERENCE_PRECISIONS)}, got {inference_precision!r}")
        if precision == "int8" and calibration is None:
            raise Flare23Error("int8 needs a calibration set (flare23 calibrate SCANS --out DIR)")
        self.window = tuple(int(w) for w in window)
        self.in_channels = int(in_channels)
        self.precision, self.calibration, self.name = precision, calibration, name
        module = module.eval()
        self.key_parts = {
            "weights_sha256": weights_digest(module),
            # what the weights do not show: layer types and their settings (activation slopes, norms, kernels)
            "structure_sha256": structure_digest(module),
            "window": list(self.window),
            "in_channels": self.in_channels,
            "precision": precision,
            "openvino": ov.__version__,
            "format": 1,
        }
        if precision == "int8":
            import nncf

            self.key_parts.update(nncf=nncf.__version__, calibration_sha256=calibration.digest,
                                  calibration_windows=calibration.count, quantization=INT8_SETTINGS)  # fmt: skip
        key = hashlib.sha256(json.dumps(self.key_parts, sort_keys=True).encode()).hexdigest()[:20]
        self.cache_dir = Path(cache_dir).expanduser()
        stem = self.cache_dir / f"{name}-{key}"
        self.xml, self.bin, self.record = stem.with_suffix(".xml"), stem.with_suffix(".bin"), stem.with_suffix(".json")
        core = ov.Core()
        model = self._read_cache(core)
        self.converted = model is None
        if model is None:
            model = self._convert(ov, module)
        self.inference_precision = inference_precision
        config = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": "LATENCY"}
        config["INFERENCE_NUM_THREADS"] = int(threads or torch.get_num_threads())
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.convert_seconds = time.perf_counter() - t0

    def _read_cache(self, core):
        if not self.record.is_file():
            return None
        try:
            record = json.loads(self.record.read_text())
            if record.get("key") != self.key_parts:
                raise ValueError("the record is for other weights, window or OpenVINO version")
            for path, digest in ((self.xml, record["xml_sha256"]), (self.bin, record["bin_sha256"])):
                if file_sha256(path) != digest:
                    raise ValueError(f"{path.name} does not match its recorded hash")
            return core.read_model(str(self.xml), str(self.bin))
        except Exception as e:  # noqa: BLE001 - any damage means: convert again
            warnings.warn(f"{self.record}: OpenVINO cache not usable ({e}); converting the network again", stacklevel=3)
            return None

    def _convert(self, ov, module):
        example = torch.zeros((1, self.in_channels, *self.window))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the trace is of one fixed window: expected
            model = ov.convert_model(module, example_input=example)
        if self.precision == "int8":
            model = quantize_int8(model, self.calibration.windows(self.name, self.window, self.in_channels))
        model.reshape({model.inputs[0]: ov.PartialShape([-1, self.in_channels, *self.window])})
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            # the record is written last: the cache counts only once both files are complete and hashed
            with atomic_path(self.xml) as tmp_xml:
                ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
                tmp_bin = tmp_xml.with_suffix(".bin")  # save_model writes the weights beside the xml
                try:
                    record = {"key": self.key_parts, "xml_sha256": file_sha256(tmp_xml), "bin_sha256": file_sha256(tmp_bin)}
                    tmp_bin.replace(self.bin)
                finally:
                    tmp_bin.unlink(missing_ok=True)
            with atomic_path(self.record) as tmp:
                tmp.write_text(json.dumps(record, indent=1))
        except (OSError, Flare23Error) as e:
            warnings.warn(f"{self.cache_dir}: cannot write the OpenVINO cache ({e}); the network is converted on every run",
                          stacklevel=3)  # fmt: skip
        return model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (self.in_channels, *self.window):
            raise ValueError(f"OpenVINO network compiled for (n, {self.in_channels}, {self.window}), got {tuple(x.shape)}")
        out = self.request.infer({0: x.detach().to("cpu", torch.float32).contiguous().numpy()})
        return torch.from_numpy(out[self.compiled.outputs[0]].copy())

    def release_memory(self) -> None:
        """Hand back the intermediate buffers OpenVINO keeps after an inference (allocated again by the next one)."""
        self.compiled.release_memory()

    def eval(self):  # the cascade treats it as a module in eval mode
        return self


class EngineNetworks:
    """The networks the cascade runs, per ``engine``: each network itself (PyTorch) or its OpenVINO compilation.

    OpenVINO runs in fp32, or int8 with ``precision="int8"`` and ``calibration`` (a ``flare23 calibrate``
    folder, checked against ``branches``, the cascade's :class:`flare23.inference.branches.Branch` objects,
    when this object is made). Where the run's precision makes PyTorch autocast to bf16 on the CPU (the caller
    says so with ``autocast``) OpenVINO runs in bf16 too, so the precision the user asked for is the one
    used, by either engine. Each network is compiled (or read from its cache in ``cache_dir``) once per
    window and precision, timed by ``timer`` as the stage ``<name>_convert``. With ``release_torch`` the
    PyTorch module's weights are freed once compiled (:func:`release_weights`; the cascade, which runs
    nothing else with them).
    """

    def __init__(self, engine: str = "torch", cache_dir=None, precision: str = "auto", calibration=None, branches=(),
                 release_torch: bool = False):  # fmt: skip
        if engine not in ENGINES:
            raise Flare23Error(f"engine {engine!r} is not one of: {', '.join(ENGINES)}")
        self.engine, self.cache_dir, self.release_torch = engine, cache_dir, bool(release_torch)
        self.int8 = precision == "int8"
        self.calibration = None
        if self.int8:
            if engine == "torch":
                raise Flare23Error("precision int8 runs on the OpenVINO engine: add --engine openvino (or auto)")
            if not calibration:
                raise Flare23Error("precision int8 needs --int8_calibration DIR, a folder made by `flare23 calibrate SCANS --out DIR`")
            self.calibration = CalibrationSet(calibration)
            for branch in branches:  # before any case: a calibration for other settings is refused at once
                self.calibration.check_branch(branch)

    def compiles(self, device) -> bool:
        """Whether :meth:`network_for` hands out OpenVINO compilations on ``device`` (False: the modules themselves)."""
        return self.int8 or check_engine(self.engine, "fp32", device) != "torch"

    def network_for(self, name: str, window: Sequence[int], net: torch.nn.Module, device, autocast: bool = False, timer=None):
        resolved = check_engine(self.engine, "int8" if self.int8 else "fp32", device, self.calibration and self.calibration.folder)
        released = getattr(net, RELEASED, False)
        if not self.int8 and resolved == "torch":
            if released:
                raise Flare23Error(f"the {name} network's PyTorch weights were freed after its OpenVINO compilation; "
                                   f"it cannot run on {torch.device(device)} with PyTorch in the same run")  # fmt: skip
            return net
        # autocast on the CPU is bf16 (fp16 autocast is CUDA's, where the engine is PyTorch); int8 runs without it
        hint = "bf16" if autocast and not self.int8 else "f32"
        # kept with the module itself (weakly: they go when it goes), so another inferer given the same module (MONAI
        # Label re-parsing a config) finds them, and a new module never gets an old one's compilation by a reused id
        compiled = _COMPILATIONS.setdefault(net, {})
        key = (name, tuple(int(w) for w in window), hint, self.calibration.digest if self.int8 else None)
        if key not in compiled:
            if released:  # its digest would be that of no weights: refuse rather than compile or read a wrong cache
                raise Flare23Error(f"the {name} network's PyTorch weights were freed after its OpenVINO compilation; "
                                   f"it cannot be compiled again (window {tuple(window)}, precision {hint})")  # fmt: skip
            with timer(f"{name}_convert") if timer is not None else contextlib.nullcontext():
                folder = self.cache_dir or cache_dir_for(None)
                compiled[key] = OpenVinoNetwork(net, window, folder, name=name, precision="int8" if self.int8 else "fp32",
                                                calibration=self.calibration, inference_precision=hint)  # fmt: skip
            if self.release_torch:
                release_weights(net)
        return compiled[key]
