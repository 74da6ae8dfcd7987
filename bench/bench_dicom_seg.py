"""What a DICOM SEG result costs against the NIfTI one: seconds and peak memory of writing each, for a CT-sized series.

Writes a synthetic axial CT series of 512 x 512 x SLICES single-frame uncompressed slices (pydicom,
0.8 x 0.8 x 2.5 mm) and a label map on its grid with all 14 FLARE labels (the ellipsoids and tubes
of ``bench_evaluate.make_case``), then, in a fresh process per measurement (so that each peak is
its own), times the writing of the result as the pipeline does it:

* ``nifti``: ``flare23.io.save_nifti`` (uint8, gzip), what ``SaveLabeld`` does;
* ``seg``: ``flare23.inference.dicom_seg.write_dicom_seg`` (re-reading the series' headers, checking
  the UIDs, building the BINARY SEG with highdicom, writing it), what ``SaveDicomSegd`` does.

Modules are imported before the clock starts (the one-time import of highdicom is reported
apart). Prints, per format, the median over ``--repeats`` of the seconds, the process's peak
resident memory and the peak above the memory held before writing (the label map, the imports),
the file size and the hardware; the extra cost of ``--format both`` / ``dicom-seg`` over ``nifti``
is the SEG's column.

    python bench/bench_dicom_seg.py [--slices 300] [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

SPACING = (0.8, 0.8, 2.5)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def write_series(folder: Path, slices: int, seed: int = 0) -> None:
    """A synthetic axial CT series, 512 x 512 x ``slices``, uncompressed int16, with the UIDs a PACS gives."""
    import datetime

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    x, y = np.meshgrid(np.linspace(-1, 1, 512), np.linspace(-1, 1, 512), indexing="ij")
    body = np.where((x / 0.8) ** 2 + (y / 0.6) ** 2 <= 1.0, 40, -1000).astype(np.int16)
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{k:05d}"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientName, ds.PatientID, ds.SeriesNumber = "CT", "Bench^Case", "bench", 2
        ds.StudyDate = datetime.date(2024, 1, 1).strftime("%Y%m%d")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-204.4, -204.4, -400.0 + k * SPACING[2]]
        ds.PixelSpacing = [SPACING[1], SPACING[0]]
        ds.SliceThickness = SPACING[2]
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = 512, 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        noisy = body + rng.integers(-10, 10, body.shape, dtype=np.int16)
        ds.PixelData = np.ascontiguousarray(noisy.astype("<i2")).tobytes()
        ds.save_as(path, enforce_file_format=True)


def worker(fmt: str, series: Path, labels_path: Path, affine_path: Path, out: Path) -> dict:
    """One measurement in this process: returns seconds, memory and file size as a dict.

    Both formats import the same modules first (the pipeline's process holds torch, MONAI, nibabel,
    pydicom and highdicom anyway), so that the memory above the pre-write level is the writer's own.
    The first write in a process (``seconds``) pays highdicom's one-time loading of the standard's
    tables; ``warm_s`` is a second write of the same result, what each further case of a batch costs.
    """
    t = time.perf_counter()
    import highdicom  # noqa: F401

    import_s = time.perf_counter() - t
    from flare23.inference.dicom_seg import write_dicom_seg
    from flare23.io import save_nifti

    labels = np.load(labels_path)
    affine = np.load(affine_path)

    def write(name: str) -> Path:
        if fmt == "seg":
            return write_dicom_seg(labels, affine, series, out / f"{name}.seg.dcm")
        return save_nifti(labels, affine, out / f"{name}.nii.gz", dtype=np.uint8)

    rss_before = _rss_mb()
    t = time.perf_counter()
    path = write("case")
    seconds = time.perf_counter() - t
    peak = _peak_mb()
    t = time.perf_counter()
    write("again")
    warm = time.perf_counter() - t
    result = {"seconds": seconds, "warm_s": warm, "import_s": import_s, "rss_before_mb": rss_before, "peak_mb": peak,
              "size_mb": Path(path).stat().st_size / 1e6}  # fmt: skip
    if fmt == "seg":
        import pydicom

        result["frames"] = int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames)
    return result


def hardware() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(next(line.split()[1] for line in f if line.startswith('MemTotal'))) / 1024**2:.0f} GiB"
    except (OSError, StopIteration):
        pass
    import highdicom
    import nibabel
    import pydicom

    return (
        f"{cpu}, {cores} usable cores ({os.cpu_count()} online), {mem} RAM, Python {platform.python_version()}, "
        f"numpy {np.__version__}, highdicom {highdicom.__version__}, pydicom {pydicom.__version__}, nibabel {nibabel.__version__}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--worker", choices=["nifti", "seg"], help=argparse.SUPPRESS)
    parser.add_argument("--series", help=argparse.SUPPRESS)
    parser.add_argument("--labels", help=argparse.SUPPRESS)
    parser.add_argument("--affine", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.series), Path(args.labels), Path(args.affine), Path(args.out))))
        return 0

    from bench_evaluate import make_case

    from flare23.data.dicom import dicom_series_headers

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_dicom_seg_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        series = work / "series"
        t = time.perf_counter()
        if not series.is_dir():
            write_series(series, args.slices, args.seed)
        headers = dicom_series_headers(series)
        print(f"series: {series} ({headers.shape[0]} x {headers.shape[1]} x {headers.shape[2]}), {time.perf_counter() - t:.1f} s")
        labels = make_case(args.slices, args.seed)[0]
        assert labels.shape == tuple(headers.shape), (labels.shape, headers.shape)
        present = [int(v) for v in np.flatnonzero(np.bincount(labels.ravel())) if v]
        np.save(work / "labels.npy", labels)
        np.save(work / "affine.npy", headers.affine)
        del labels
        runs: dict[str, list[dict]] = {"nifti": [], "seg": []}
        for r in range(args.repeats):
            for fmt in ("nifti", "seg"):
                out = work / f"out_{fmt}_{r}"
                out.mkdir(exist_ok=True)
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", fmt, "--series", str(series),
                       "--labels", str(work / "labels.npy"), "--affine", str(work / "affine.npy"), "--out", str(out)]  # fmt: skip
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[fmt].append(json.loads(done.stdout.strip().splitlines()[-1]))
                shutil.rmtree(out)
        med = {f: {k: statistics.median(run[k] for run in v) for k in v[0]} for f, v in runs.items()}
        print(f"hardware: {hardware()}")
        print(f"labels present: {present} ({len(present)} segments); SEG frames: {int(med['seg']['frames'])}")
        print(
            "| result | median s (first write in a process) | runs s | median s (a further case) | peak RSS MB | peak above pre-write MB | file MB |"
        )
        print("|---|---|---|---|---|---|---|")
        for fmt, name in (("nifti", "NIfTI (`save_nifti`, uint8 gzip)"), ("seg", "DICOM SEG (`write_dicom_seg`, BINARY)")):
            m = med[fmt]
            times = ", ".join(f"{run['seconds']:.2f}" for run in runs[fmt])
            print(
                f"| {name} | {m['seconds']:.2f} | {times} | {m['warm_s']:.2f} | {m['peak_mb']:.0f} | {m['peak_mb'] - m['rss_before_mb']:.0f} | {m['size_mb']:.1f} |"
            )
        extra_s = med["seg"]["seconds"] - med["nifti"]["seconds"]
        extra_mb = med["seg"]["peak_mb"] - med["nifti"]["peak_mb"]
        print(
            f"SEG against NIfTI: {extra_s:+.2f} s ({med['seg']['seconds'] / med['nifti']['seconds']:.1f}x; a further case "
            f"{med['seg']['warm_s'] - med['nifti']['warm_s']:+.2f} s), peak memory {extra_mb:+.0f} MB; --format both adds "
            f"{med['seg']['seconds']:.2f} s to a one-case run; import of highdicom {med['seg']['import_s']:.2f} s (once)"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
