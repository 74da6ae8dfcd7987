"""``flare23 segment -i INPUT -o OUTPUT``: the pipeline bundle for people who do not write MONAI commands.

It runs exactly ``bundles/pipeline/configs/inference.json`` (the same workflow as ``python -m
monai.bundle run evaluating ...``), with ``dataset_dir`` = INPUT and ``output_dir`` = OUTPUT, and
passes every further ``--id value`` on as a bundle override (``--load_pretrain false``,
``--block_size 64``, ``--organ_ckpt path``, ...). INPUT is a NIfTI file, a folder of them, a DICOM
series folder or a folder of series; OUTPUT is a file when INPUT is one NIfTI file or one series
and OUTPUT ends with ``.nii.gz`` / ``.nii``, else a folder. Errors are one line and exit 2.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from flare23.errors import Flare23Error
from flare23.io import ensure_output_dir, is_nifti

#: The bundles shipped with the project (an editable install keeps them beside the package).
BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"


def pipeline_config(bundles_dir: str | os.PathLike | None = None) -> Path:
    root = Path(bundles_dir) if bundles_dir else BUNDLES_DIR
    config = root / "pipeline" / "configs" / "inference.json"
    if not config.is_file():
        raise Flare23Error(f"{config}: pipeline bundle not found (pass --bundles_dir pointing at the project's bundles/ folder)")
    return config


def user_error_in(exc: BaseException) -> Flare23Error | None:
    """The :class:`Flare23Error` behind an exception that MONAI's config parser wrapped, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Flare23Error):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def run_pipeline(dataset_dir, output_dir, bundles_dir=None, **overrides):
    """Run the pipeline bundle workflow (initialize, run, finalize) and return it.

    A user error raised anywhere inside the workflow (MONAI wraps it in a ``RuntimeError``) comes
    out as the original one-line :class:`Flare23Error`.
    """
    try:
        return _run_workflow(dataset_dir, output_dir, bundles_dir, **overrides)
    except Exception as exc:
        user = user_error_in(exc)
        if user is not None:
            raise user from None
        raise


def _run_workflow(dataset_dir, output_dir, bundles_dir=None, **overrides):
    from monai.bundle import ConfigWorkflow

    config = pipeline_config(bundles_dir)
    overrides = {k.replace("-", "_") if "#" not in k else k: v for k, v in overrides.items()}
    workflow = ConfigWorkflow(
        config_file=str(config),
        workflow_type="infer",
        logging_file=False,
        bundle_root=str(config.parents[1]),
        dataset_dir=str(dataset_dir),
        output_dir=str(output_dir),
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def segment(input: str, output: str, device: str | None = None, bundles_dir: str | None = None, **overrides) -> list[Path]:
    """Segment INPUT into OUTPUT with the pipeline bundle; returns the written files."""
    from flare23.readers import list_cases

    src, dst = Path(input), Path(output)
    cases = list_cases(src)
    if device is not None:
        overrides["device"] = str(device)
    single_file = len(cases) == 1 and is_nifti(dst.name)
    if not single_file and is_nifti(dst.name):
        raise Flare23Error(f"{dst}: {len(cases)} cases in {src}, so the output must be a folder, not a NIfTI file name")
    # The output location is checked before any work: a run of many cases must not fail at the end.
    ensure_output_dir(dst.parent if single_file else dst)
    if single_file:
        if dst.exists() and dst.resolve() == cases[0].path.resolve():
            raise Flare23Error(f"{dst}: refusing to write the result over the input")
        work = Path(tempfile.mkdtemp(prefix=".flare23-", dir=dst.parent))
        try:
            run_pipeline(src, work, bundles_dir, **overrides)
            produced = work / f"{cases[0].name}.nii.gz"
            if not produced.is_file():
                raise Flare23Error(f"{src}: the pipeline wrote no result")
            os.replace(produced, dst)
            for name in ("efficiency.csv", "timings.csv"):
                if (work / name).is_file():
                    os.replace(work / name, dst.parent / f"{dst.name.split('.')[0]}_{name}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return [dst]
    run_pipeline(src, dst, bundles_dir, **overrides)
    return [dst / f"{c.name}.nii.gz" for c in cases if (dst / f"{c.name}.nii.gz").is_file()]


def segment_cli(
    i: str | None = None, o: str | None = None, device: str | None = None, bundles_dir: str | None = None, **overrides
):
    """Segment CT scans: ``flare23 segment -i INPUT -o OUTPUT [--device cpu|cuda] [--id value ...]``."""
    if not i or not o:
        raise Flare23Error("segment needs -i INPUT and -o OUTPUT")
    written = segment(i, o, device=device, bundles_dir=bundles_dir, **overrides)
    for path in written:
        print(f"wrote {path}")


def pack_cli(out: str | None = None, bundles_dir: str | None = None, **overrides) -> None:
    """Pack the three sub-bundles' ``models/model.pt`` into the pipeline's combined ``models/model.pt``.

    ``flare23 pack [--out PATH] [--roi_ckpt P --organ_ckpt P --tumor_ckpt P] [--organ_overrides "{...}"]``:
    the networks are built from the pipeline config (with the same overrides as for inference),
    each checkpoint is loaded strictly (``weights_only=True``), and one state dict with keys
    ``roi.*``, ``organ.*``, ``tumor.*`` is written atomically, so that MONAI Label loads the pipeline
    bundle as a single model.
    """
    from monai.bundle import ConfigParser

    from flare23.inference import pack_checkpoints

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
