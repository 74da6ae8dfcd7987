"""``flare23 segment -i INPUT -o OUTPUT``: the pipeline bundle for people who do not write MONAI commands.

It runs exactly ``bundles/pipeline/configs/inference.json`` (the same workflow as ``python -m
monai.bundle run evaluating ...``), with ``dataset_dir`` = INPUT and ``output_dir`` = OUTPUT, and
passes every further ``--id value`` on as a bundle override (``--load_pretrain false``,
``--block_size 64``, ``--organ_ckpt path``, ...). INPUT is a NIfTI file, a folder of them, a DICOM
series folder or a folder of series; OUTPUT is a file when INPUT is one NIfTI file or one series
and OUTPUT ends with ``.nii.gz`` / ``.nii``, else a folder. Errors are one line and exit 2; an
option or override key that names no id of the pipeline (or of the sub-bundle, for
``--roi_overrides`` / ``--organ_overrides`` / ``--tumor_overrides``) is refused before any work,
with the closest valid id.

``--format nifti|dicom-seg|both`` (the pipeline's ``output_format`` id) chooses the result files:
``<case>.nii.gz`` (default), a DICOM Segmentation ``<case>.seg.dcm`` in the source's study
(:mod:`flare23.inference.dicom_seg`), or both. A DICOM SEG needs DICOM series as input: a NIfTI
input, a series whose UIDs a SEG cannot reference, or an output folder inside a series folder is a
one-line error before any work. For one case, OUTPUT may name the file: ``x.nii.gz`` (with
``both`` the SEG goes beside it as ``x.seg.dcm``) or ``x.dcm`` / ``x.seg.dcm`` (``dicom-seg``; with
``both`` the NIfTI goes beside it as ``x.nii.gz``).

Side files, per output folder: ``timings.csv`` (seconds per stage and case), ``efficiency.csv``
(wall time, peak memory, memory-time area) and ``<case>_roi.json`` per case (the ROI box in voxel
indices and world mm, the stage times, the thread count: :class:`flare23.inference.cases.CascadeReport`).
When OUTPUT is a file ``<name>.nii.gz`` they are named ``<name>_timings.csv``,
``<name>_efficiency.csv`` and ``<name>_roi.json`` (``a.1.nii.gz`` -> ``a.1_timings.csv``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from flare23.bundles import PACKAGE_BUNDLES_DIR, user_error_in
from flare23.errors import Flare23Error
from flare23.io import ensure_output_dir, is_nifti, strip_nifti_suffix

#: The files that the pipeline writes beside the results (named ``<name>_<file>`` beside an output file).
SIDE_FILES = ("efficiency.csv", "timings.csv", "roi.json")
#: Ids that ``flare23 segment`` sets itself (from -i and -o).
_SET_BY_SEGMENT = {"dataset_dir": "-i INPUT", "output_dir": "-o OUTPUT", "bundle_root": "--bundles_dir"}

#: The bundles shipped with the project (an editable install keeps them beside the package).
BUNDLES_DIR = PACKAGE_BUNDLES_DIR


def pipeline_config(bundles_dir: str | os.PathLike | None = None) -> Path:
    root = Path(bundles_dir) if bundles_dir else BUNDLES_DIR
    config = root / "pipeline" / "configs" / "inference.json"
    if not config.is_file():
        raise Flare23Error(f"{config}: pipeline bundle not found (pass --bundles_dir pointing at the project's bundles/ folder)")
    return config


def _sub_bundle_dir(config: Path, overrides: dict, part: str, folder: str) -> Path | None:
    """The sub-bundle folder that the pipeline will use for ``part`` (None when an expression picks it)."""
    given = overrides.get(f"{part}_bundle")
    if given is None:
        return config.parents[2] / folder
    return None if str(given).startswith("$") else Path(str(given))


def check_overrides(overrides: dict, bundles_dir=None) -> None:
    """Refuse, before any work, an override whose id the pipeline (or, for ``*_overrides``, the sub-bundle) lacks."""
    from monai.bundle import ConfigParser

    from flare23.bundles import SubBundle, check_id

    config = pipeline_config(bundles_dir)
    parser = ConfigParser()
    parser.read_config(str(config))
    for key in overrides:
        if key in _SET_BY_SEGMENT:
            raise Flare23Error(f"--{key}: set by flare23 segment's {_SET_BY_SEGMENT[key]}; do not pass it as an option")
        check_id(parser, key, f"--{key}: the pipeline bundle ({config})")
    for part, folder in (("roi", "roi_extractor"), ("organ", "organ_seg"), ("tumor", "tumor_seg")):
        sub = overrides.get(f"{part}_overrides")
        where = _sub_bundle_dir(config, overrides, part, folder)
        if sub is None or where is None or not (where / "configs" / "inference.json").is_file():
            continue  # a missing sub-bundle is reported by the run itself
        if not isinstance(sub, dict):
            raise Flare23Error(f"--{part}_overrides: expected a dict such as \"{{'patch_size': [64, 64, 32]}}\", got {sub!r}")
        try:
            SubBundle(where, "inference.json", sub)
        except Flare23Error as exc:
            raise Flare23Error(f"--{part}_overrides: {exc}") from None


def _no_logging_file_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Logging file is set to False")


def config_workflow(**kwargs):
    """``ConfigWorkflow(logging_file=False, ...)`` without MONAI's notice "Logging file is set to False, skipping logging."."""
    from monai.bundle import ConfigWorkflow

    notice = logging.getLogger("monai.bundle.workflows")  # the logger ConfigWorkflow.__init__ warns on
    notice.addFilter(_no_logging_file_notice)
    try:
        return ConfigWorkflow(logging_file=False, **kwargs)
    finally:
        notice.removeFilter(_no_logging_file_notice)


def run_pipeline(dataset_dir, output_dir, bundles_dir=None, **overrides):
    """Run the pipeline bundle workflow (initialize, run, finalize) and return it.

    A user error raised anywhere inside the workflow (MONAI wraps it in a ``RuntimeError``) comes
    out as the original one-line :class:`Flare23Error`.
    """
    try:
        return _run_workflow(dataset_dir, output_dir, bundles_dir, **overrides)
    except Exception as exc:
        user = user_error_in(exc) or _bad_argument(exc)
        if user is not None:
            raise user from None
        raise


def _bad_argument(exc: BaseException) -> Flare23Error | None:
    """A component that refused a keyword (``--organ_overrides "{'network_def#filtres': ...}"``) as one line."""
    import re

    component, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        found = re.search(r"Failed to instantiate component '([^']+)'", text)
        component = found.group(1) if found else component
        bad = re.search(r"got an unexpected keyword argument '([^']+)'", text)
        if isinstance(exc, TypeError) and bad:
            return Flare23Error(f"{component or 'a component'} takes no argument {bad.group(1)!r}: {text}")
        exc = exc.__cause__ or exc.__context__
    return None


def _normalise(overrides: dict) -> dict:
    return {k.replace("-", "_") if "#" not in k else k: v for k, v in overrides.items()}


def _run_workflow(dataset_dir, output_dir, bundles_dir=None, **overrides):
    config = pipeline_config(bundles_dir)
    workflow = config_workflow(
        config_file=str(config),
        workflow_type="infer",
        bundle_root=str(config.parents[1]),
        dataset_dir=str(dataset_dir),
        output_dir=str(output_dir),
        **_normalise(overrides),
    )
    try:
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    finally:  # never leave the background weight loader running (an abort at exit)
        network = workflow.parser.ref_resolver.resolved_content.get("network")
        if hasattr(network, "join"):
            network.join()
    return workflow


def _user_paths(exc: Flare23Error, work: Path, dst: Path, produced: str, stem: str) -> Flare23Error:
    """``exc`` with the temporary folder of a single-file run replaced by the paths the user named."""
    text = str(exc)
    for folder in dict.fromkeys((str(work), str(work.absolute()), str(work.resolve()))):
        text = text.replace(os.path.join(folder, produced), str(dst))
        for name in SIDE_FILES:
            text = text.replace(os.path.join(folder, name), str(dst.parent / f"{stem}_{name}"))
        text = text.replace(folder, str(dst.parent))
    return exc if text == str(exc) else Flare23Error(text)


def _is_seg_name(name: str) -> bool:
    return name.lower().endswith(".dcm")


def _stem(name: str) -> str:
    """The case name that an output file names: ``a.1.nii.gz`` -> ``a.1``, ``a.seg.dcm`` / ``a.dcm`` -> ``a``."""
    from flare23.inference.dicom_seg import SEG_SUFFIX

    lower = name.lower()
    for suffix in (SEG_SUFFIX, ".dcm"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return strip_nifti_suffix(name)


def _output_format(format, overrides: dict) -> str:
    """``--format`` and the bundle id ``--output_format`` (either; both must agree), checked; default ``nifti``."""
    from flare23.inference.cases import check_output_format

    given = overrides.pop("output_format", None)
    if format is not None and given is not None and check_output_format(format) != check_output_format(given):
        raise Flare23Error(f"--format {format} and --output_format {given} disagree; give one of them")
    return check_output_format(format if format is not None else given if given is not None else "nifti")


def _check_seg_inputs(cases, src: Path, dst: Path, single_file: bool, fmt: str) -> dict:
    """Before any work: every case is a DICOM series that a SEG can reference, and no SEG would land in a series folder.

    Returns ``{case name: checked series}``. A series that the reader will refuse anyway (a missing slice,
    two series) is left to it: the batch reports it and goes on.
    """
    from flare23.data.dicom import dicom_series_headers
    from flare23.inference.dicom_seg import check_seg_source

    for case in cases:
        if case.kind != "dicom":
            raise Flare23Error(
                f"{case.path}: --format {fmt} needs DICOM series as input; this is a NIfTI file (use --format nifti)"
            )
    target = (dst.parent if single_file else dst).resolve()
    if src.is_dir() and target == src.resolve():
        raise Flare23Error(
            f"{dst}: the input folder itself; a SEG there would be read as part of the input next time: choose another output folder"
        )
    series = {}
    for case in cases:
        if target == case.path.resolve():
            raise Flare23Error(
                f"{dst}: inside the input series folder {case.path}; the SEG would become part of the input series: "
                "choose another output folder"
            )
        try:
            found = dicom_series_headers(case.path)
        except Flare23Error:
            continue  # reported by the reader, for this case only
        check_seg_source(found)
        series[case.name] = found
    return series


def segment(
    input: str,
    output: str,
    device: str | None = None,
    bundles_dir: str | None = None,
    threads=None,
    format: str | None = None,
    **overrides,
) -> list[Path]:
    """Segment INPUT into OUTPUT with the pipeline bundle; returns the written result files (NIfTI and / or DICOM SEG)."""
    from flare23.data.readers import list_cases
    from flare23.efficiency import parse_threads
    from flare23.inference.cases import wants_nifti, wants_seg
    from flare23.inference.dicom_seg import SEG_SUFFIX

    src, dst = Path(input), Path(output)
    overrides = _normalise(overrides)
    fmt = _output_format(format, overrides)
    overrides["output_format"] = fmt
    if device is not None:
        overrides["device"] = str(device)
    if threads is not None:
        overrides["threads"] = parse_threads(threads)
    check_overrides(overrides, bundles_dir)  # a misspelt option fails now, not after the first case
    named_file = is_nifti(dst.name) or _is_seg_name(dst.name)
    if _is_seg_name(dst.name) and not wants_seg(fmt):
        raise Flare23Error(
            f"{dst}: a .dcm output is a DICOM SEG; add --format dicom-seg (or both), or name a .nii.gz file or a folder"
        )
    if is_nifti(dst.name) and not wants_nifti(fmt):
        raise Flare23Error(f"{dst}: --format {fmt} writes a DICOM SEG; name the output <name>{SEG_SUFFIX} or a folder")
    cases = list_cases(src)
    single_file = len(cases) == 1 and named_file
    if not single_file and named_file:
        kind = "NIfTI" if is_nifti(dst.name) else "DICOM"
        raise Flare23Error(f"{dst}: {len(cases)} cases in {src}, so the output must be a folder, not a {kind} file name")
    if wants_seg(fmt):
        _check_seg_inputs(cases, src, dst, single_file, fmt)
    # The output location is checked before any work: a run of many cases must not fail at the end.
    ensure_output_dir(dst.parent if single_file else dst)
    if single_file:
        if dst.exists() and dst.resolve() == cases[0].path.resolve():
            raise Flare23Error(f"{dst}: refusing to write the result over the input")
        stem = _stem(dst.name)  # the whole case name: a.1.nii.gz -> a.1
        targets = {}  # produced file name in the work folder -> where it goes
        if wants_nifti(fmt):
            targets[f"{cases[0].name}.nii.gz"] = dst if is_nifti(dst.name) else dst.parent / f"{stem}.nii.gz"
        if wants_seg(fmt):
            targets[f"{cases[0].name}{SEG_SUFFIX}"] = dst if _is_seg_name(dst.name) else dst.parent / f"{stem}{SEG_SUFFIX}"
        work = Path(tempfile.mkdtemp(prefix=".flare23-", dir=dst.parent))
        produced = next(name for name, target in targets.items() if target == dst)  # the file named by -o
        written = []
        try:
            run_pipeline(src, work, bundles_dir, **overrides)
            if not any((work / name).is_file() for name in targets):
                raise Flare23Error(f"{src}: the pipeline wrote no result")
            for name, target in targets.items():
                if (work / name).is_file():
                    os.replace(work / name, target)
                    written.append(target)
            for name in SIDE_FILES:
                source = work / (f"{cases[0].name}_{name}" if name == "roi.json" else name)
                if source.is_file():
                    os.replace(source, dst.parent / f"{stem}_{name}")
        except Flare23Error as exc:  # name the user's output, not the temporary folder removed below
            raise _user_paths(exc, work, dst, produced, stem) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return written
    run_pipeline(src, dst, bundles_dir, **overrides)
    names = [f"{c.name}.nii.gz" for c in cases] if wants_nifti(fmt) else []
    names += [f"{c.name}{SEG_SUFFIX}" for c in cases] if wants_seg(fmt) else []
    return [dst / n for n in names if (dst / n).is_file()]


def segment_cli(
    i: str | None = None,
    o: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    bundles_dir: str | None = None,
    format: str | None = None,
    **overrides,
):
    """Segment CT scans: ``flare23 segment -i INPUT -o OUTPUT [--format nifti|dicom-seg|both] [--device cpu|cuda] [--threads N] [--id value ...]``.

    Every further ``--id value`` overrides an id of the pipeline bundle (listed below with its
    default); an unknown id is refused. Writes OUTPUT and, beside it, the timings, efficiency and
    per-case ROI records (``<name>_timings.csv``, ``<name>_efficiency.csv``, ``<name>_roi.json``).

    Args:
        i: a NIfTI file, a folder of them, a DICOM series folder or a folder of series (required).
        o: the output: a ``.nii.gz`` / ``.nii`` file (or, with a DICOM SEG, a ``.dcm`` file) for one input case, else a folder (required).
        device: ``cpu``, ``cuda`` or ``cuda:N``; default (None): CUDA when torch sees a GPU, else the CPU.
        threads: CPU threads of torch; default (None): the pipeline's ``threads`` id, 0 = ``OMP_NUM_THREADS`` when set, else the CPUs that this process may use (affinity and cgroup quota).
        bundles_dir: the project's ``bundles/`` folder; default (None): the one beside the installed package.
        format: ``nifti`` (``<case>.nii.gz``), ``dicom-seg`` (a DICOM Segmentation ``<case>.seg.dcm`` in the source's study; needs DICOM series as input) or ``both``; default (None): the pipeline's ``output_format`` id, ``nifti``.
    """
    if not i or not o:
        raise Flare23Error("segment needs -i INPUT and -o OUTPUT (flare23 segment --help)")
    written = segment(i, o, device=device, bundles_dir=bundles_dir, threads=threads, format=format, **overrides)
    for path in written:
        print(f"wrote {path}")


def pipeline_ids_help(bundles_dir=None) -> str:
    """The pipeline bundle's overridable ids with their defaults, for ``flare23 segment --help``."""
    import json

    config = pipeline_config(bundles_dir)
    data = json.loads(config.read_text(encoding="utf-8"))
    skip = {"imports", "initialize", "run", "evaluating", "finalize", "checkpointloader", "network", "datalist"}
    lines = [f"PIPELINE BUNDLE IDS ({config}; --id value, defaults as in the file)"]
    for key, value in data.items():
        if key in skip or key in _SET_BY_SEGMENT or key.endswith("_config") or (isinstance(value, dict) and "_target_" in value):
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            continue
        text = json.dumps(value)
        lines.append(f"    --{key}={text if len(text) <= 100 else text[:97] + '...'}")
    return "\n".join(lines)


def pack_cli(out: str | None = None, bundles_dir: str | None = None, **overrides) -> None:
    """Pack the three sub-bundles' ``models/model.pt`` into the pipeline's combined ``models/model.pt``.

    ``flare23 pack [--out PATH] [--roi_ckpt P --organ_ckpt P --tumor_ckpt P] [--organ_overrides "{...}"]``:
    the networks are built from the pipeline config (with the same overrides as for inference),
    each checkpoint is loaded strictly (``weights_only=True``), and one state dict with keys
    ``roi.*``, ``organ.*``, ``tumor.*`` is written atomically, so that MONAI Label loads the pipeline
    bundle as a single model.
    """
    from monai.bundle import ConfigParser

    from flare23.inference.weights import pack_checkpoints

    config = pipeline_config(bundles_dir)
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(config.parents[1])
    for key, value in overrides.items():
        parser[key] = value
    networks = parser.get_parsed_content("network_def")
    target = Path(out) if out else Path(parser.get_parsed_content("combined_ckpt"))
    paths = [parser.get_parsed_content(f"{p}_ckpt") for p in ("roi", "organ", "tumor")]
    pack_checkpoints(*paths, target, networks)
    print(f"wrote {target} ({sum(v.numel() for v in networks.state_dict().values()) / 1e6:.2f} M values)")
