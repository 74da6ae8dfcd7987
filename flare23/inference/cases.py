"""The pipeline's case I/O: datalists from a folder or a split, reading a case, saving the label map, the run report."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from monai.transforms import MapTransform

from flare23.errors import Flare23Error
from flare23.inference.cascade import CascadeInferer
from flare23.roi.transforms import FileWriterd

logger = logging.getLogger(__name__)


def datalist_from_input(input_path) -> list[dict]:
    """Pipeline datalist: one ``{"image": path, "kind": "nifti"|"dicom", "name": case}`` per input case."""
    from flare23.data.readers import list_cases

    return [{"image": str(c.path), "kind": c.kind, "name": c.name} for c in list_cases(input_path)]


def datalist_from_split(datalist, split: str = "validation") -> list[dict]:
    """Pipeline datalist from the ``split`` of a MONAI datalist JSON (labels are not read)."""
    from flare23.evaluation.evaluate import datalist_split
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

        from flare23.data.readers import Case, read_case
        from flare23.io import case_name

        d = dict(data)
        for key in self.key_iterator(d):
            given = str(d[key]) if d[key] is not None else ""
            path = Path(given)
            # a datalist names each case; MONAI Label passes only the path: the case is then the file's name
            # without its NIfTI extension (as flare23.data.readers.list_cases names it), or the series folder's name
            name = d.get("name") or (path.name if path.is_dir() else case_name(path))
            case = Case(name, path, d.get("kind") or ("dicom" if path.is_dir() else "nifti"))
            try:
                if not given.strip():
                    # e.g. MONAI Label's answer to an image id that its datastore does not hold: Path("") would be
                    # the working folder, read as a DICOM series
                    raise Flare23Error("no input image: the path is empty (an image id that the datastore does not hold?)")
                if not path.exists():
                    raise Flare23Error(f"{path}: no such file or folder")
                array, affine, _meta = read_case(case)
            except Flare23Error as exc:  # reported by the inferer; the batch goes on
                meta = {"filename_or_obj": given, "case": case.name, "error": str(exc)}
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


#: What the pipeline writes per case (``output_format``, ``flare23 segment --format``).
OUTPUT_FORMATS = ("nifti", "dicom-seg", "both")


def check_output_format(value) -> str:
    """``value`` as one of :data:`OUTPUT_FORMATS` (``dicom_seg`` and any case accepted), else a one-line error."""
    text = str(value).strip().lower().replace("_", "-")
    if text == "dicomseg" or text == "seg":
        text = "dicom-seg"
    if text not in OUTPUT_FORMATS:
        raise Flare23Error(f"--format {value}: expected one of {', '.join(OUTPUT_FORMATS)}")
    return text


def wants_seg(output_format: str) -> bool:
    return check_output_format(output_format) in ("dicom-seg", "both")


def wants_nifti(output_format: str) -> bool:
    return check_output_format(output_format) in ("nifti", "both")


class SaveLabeld(FileWriterd):
    """Write ``d[key]`` (a label map ``(1, X, Y, Z)``) as uint8 NIfTI ``output_dir/<case>.nii.gz``, atomically.

    Shape and affine are those of ``d[meta_key]`` (the input image). Nothing is written when
    ``output_format`` is ``dicom-seg`` (:class:`flare23.inference.dicom_seg.SaveDicomSegd` writes the SEG). An output path equal to the
    input path is refused: results go next to, never over, the user's files. A
    :class:`~flare23.roi.transforms.FileWriterd`: MONAI Label drops it from the postprocessing and
    writes its answer itself, so a request leaves no file behind.
    """

    def __init__(self, keys="pred", output_dir: str = "output", meta_key: str = "image", output_postfix: str = "",
                 output_format: str = "nifti"):  # fmt: skip
        super().__init__(keys)
        self.output_format = check_output_format(output_format)
        self.output_dir = Path(output_dir)
        self.meta_key = meta_key
        self.output_postfix = output_postfix
        self.written: list[Path] = []

    def __call__(self, data):
        from flare23.io import ensure_output_dir, save_nifti

        d = dict(data)
        ref = d[self.meta_key]
        if ref.meta.get("error") or not wants_nifti(self.output_format):
            return d  # a failed case, or a run asked for the DICOM SEG only: nothing is written here
        affine = np.asarray(ref.affine.detach().cpu().numpy(), dtype=float)
        source = Path(str(ref.meta.get("filename_or_obj", "")))
        name = str(ref.meta.get("case") or source.name)
        for labels in case_label_maps(d, self.key_iterator(d)):
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


def case_label_maps(data: dict, keys):
    """The label maps under ``keys`` of a case's dict, as numpy arrays; an empty one (a case the inferer failed and
    reported) is skipped. What every writer of the pipeline's result (NIfTI, DICOM SEG) starts from."""
    for key in keys:
        labels = data[key]
        labels = labels.as_tensor() if hasattr(labels, "as_tensor") else labels
        labels = labels.detach().cpu().numpy()
        if labels.size:
            yield labels


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
    record with ``roi_box`` (:meth:`flare23.roi.box.RoiBox.to_json` with the input's affine: voxel
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

        # this report lists the failed cases and fails the run at its end: the inferer may go on after one
        self.inferer.collect_failures = True
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
            # windows each network ran and skipped (skip_air_windows, tumor_windows): the inferer's record of this case
            "windows": getattr(self.inferer, "window_counts", [None])[-1] if getattr(self.inferer, "window_counts", None) else None,
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
