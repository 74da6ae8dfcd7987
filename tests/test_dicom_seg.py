"""DICOM SEG output (issue 25), checked by readers we did not write.

dcmqi's ``segimage2itkimage`` (the converter behind 3D Slicer's DICOM SEG import) turns each SEG
back into a volume, which must equal our NIfTI result voxel for voxel in world coordinates
(:func:`in_grid` maps one grid onto the other exactly; they share voxel centres, in any axis
order); highdicom and pydicom read back the segment names, the SNOMED CT codes, the algorithm
identification and the references to the source series. Two sources: the real DICOM series of
``../shared/data/real_ct/ts_example_dicom`` (axial, JPEG 2000; its anonymiser blanked the UIDs, so
the tests give a copy the UIDs a PACS would, and check that the original is refused), and a
series that the tests write from the real CT of ``ts_example_ct`` in another orientation
(sagittal slices, :func:`corpus.write_dicom_volume`). The label maps hold every FLARE label
(the writer on its own) or what tiny random networks make of the scan (``flare23 segment``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import dcmqi  # noqa: F401 - a test dependency (requirements-test.txt): missing, the tests fail, never skip
import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from corpus import (
    VALID,
    WARNING,
    body,
    constant_checkpoints,
    copy_series_with_uids,
    dicom_corpus,
    write_dicom_series,
    write_dicom_volume,
)
from test_pipeline_bundle import TINY, _env, _tiny_args

from flare23.constants import FOREGROUND_IDS, LABEL_SNOMED, LABELS
from flare23.data.dicom import read_dicom_series
from flare23.data.readers import Case, read_case
from flare23.errors import Flare23Error
from flare23.inference.dicom_seg import SEG_SUFFIX, write_dicom_seg
from flare23.io import save_nifti

ROOT = Path(__file__).resolve().parents[1]
NAME_TO_LABEL = {name: i for i, name in LABELS.items()}
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _segimage2itkimage() -> str:
    beside = Path(sys.executable).parent / "segimage2itkimage"
    found = str(beside) if beside.exists() else shutil.which("segimage2itkimage")
    assert found, "dcmqi's segimage2itkimage not found: pip install -r requirements-test.txt"
    return found


# --- independent readers and exact grid comparison -----------------------------------------------------------------------
def dcmqi_read(seg: Path, out: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """dcmqi's reading of ``seg``: ``(FLARE label map, affine, {FLARE id: dcmqi's segment attributes})``.

    The segments are merged into one label volume (ours never overlap); dcmqi's label values are
    mapped to FLARE ids through the segment labels dcmqi read.
    """
    out.mkdir(parents=True, exist_ok=True)
    cmd = [_segimage2itkimage(), "--inputDICOM", str(seg), "--outputDirectory", str(out), "-t", "nifti", "--mergeSegments"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    volumes = sorted(out.glob("*.nii.gz"))
    assert len(volumes) == 1, (volumes, r.stdout[-2000:])  # non-overlapping segments: one merged volume
    meta = json.loads((out / "meta.json").read_text())
    attrs = {int(s["labelID"]): s for group in meta["segmentAttributes"] for s in group}
    img = nib.load(str(volumes[0]))
    values = np.asarray(img.dataobj).astype(np.int64)
    lut = np.zeros(max(attrs) + 1, dtype=np.uint8)
    for label_id, s in attrs.items():
        lut[label_id] = NAME_TO_LABEL[s["SegmentLabel"]]
    assert set(np.unique(values)) <= {0, *attrs}
    return lut[values], img.affine, {NAME_TO_LABEL[s["SegmentLabel"]]: s for s in attrs.values()}


def in_grid(values: np.ndarray, affine: np.ndarray, shape, target_affine: np.ndarray) -> np.ndarray:
    """``values`` (on the grid of ``affine``) on the grid ``(shape, target_affine)``, exactly: 0 where it has no voxel.

    The two grids must share voxel centres (one is the other's axes permuted and flipped, and shifted by
    whole voxels); anything else fails, as a resampling would hide an error.
    """
    t = np.linalg.inv(np.asarray(affine, dtype=float)) @ np.asarray(target_affine, dtype=float)  # target -> source index
    r = np.round(t[:3, :3])
    assert np.allclose(t[:3, :3], r, atol=1e-4) and abs(round(np.linalg.det(r))) == 1, t
    assert np.allclose(t[:3, 3], np.round(t[:3, 3]), atol=1e-3), t
    perm = [int(np.argmax(np.abs(r[:, i]))) for i in range(3)]  # source axis of each target axis
    target_sel, source_sel = [], [None] * 3
    for i in range(3):
        idx = np.arange(shape[i])
        src = (r[perm[i], i] * idx + np.round(t[perm[i], 3])).astype(np.int64)
        ok = (src >= 0) & (src < values.shape[perm[i]])
        target_sel.append(idx[ok])
        source_sel[perm[i]] = src[ok]
    out = np.zeros(tuple(shape), dtype=values.dtype)
    out[np.ix_(*target_sel)] = values[np.ix_(*source_sel)].transpose(perm)
    return out


def assert_same_in_world(seg_labels, seg_affine, ours, our_affine) -> None:
    """dcmqi's volume equals ours voxel for voxel in world coordinates (and holds nothing outside our grid)."""
    on_ours = in_grid(seg_labels, seg_affine, ours.shape, our_affine)
    assert np.count_nonzero(on_ours) == np.count_nonzero(seg_labels), "the SEG holds voxels outside the result's grid"
    diff = np.count_nonzero(on_ours != ours)
    assert diff == 0, f"{diff} voxels differ between the SEG (read by dcmqi) and the NIfTI result"


def _code(item) -> tuple[str, str, str]:
    return (str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning))


def check_segments(seg_path: Path, labels_present, source_folder: Path) -> pydicom.Dataset:
    """highdicom and pydicom read back names, codes, algorithm identification and references; returns the dataset."""
    expected = sorted(int(v) for v in labels_present)
    # highdicom
    seg = hd.seg.segread(seg_path)
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    numbers = list(seg.segment_numbers)
    assert numbers == list(range(1, len(expected) + 1))
    for number, label in zip(numbers, expected):
        desc = seg.get_segment_description(number)
        category, kind, modifier = LABEL_SNOMED[label]
        assert desc.segment_label == LABELS[label]
        assert (desc.segmented_property_category.value, desc.segmented_property_category.meaning) == category
        assert (desc.segmented_property_type.value, desc.segmented_property_type.meaning) == kind
        assert desc.segmented_property_category.scheme_designator == desc.segmented_property_type.scheme_designator == "SCT"
        assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    # pydicom
    ds = pydicom.dcmread(seg_path)
    assert ds.SOPClassUID == SEGMENTATION_STORAGE and ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    versions = {
        b: json.loads((ROOT / "bundles" / b / "configs" / "metadata.json").read_text())["version"]
        for b in ("pipeline", "roi_extractor", "organ_seg", "tumor_seg")
    }
    for item, label in zip(ds.SegmentSequence, expected):
        category, kind, modifier = LABEL_SNOMED[label]
        assert item.SegmentLabel == LABELS[label] and item.SegmentDescription == f"FLARE label {label}"
        assert _code(item.SegmentedPropertyCategoryCodeSequence[0]) == (category[0], "SCT", category[1])
        type_item = item.SegmentedPropertyTypeCodeSequence[0]
        assert _code(type_item) == (kind[0], "SCT", kind[1])
        mods = type_item.get("SegmentedPropertyTypeModifierCodeSequence")
        assert (_code(mods[0]) if mods else None) == ((modifier[0], "SCT", modifier[1]) if modifier else None)
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "flare23 pipeline" and algo.AlgorithmVersion == versions["pipeline"]
        assert _code(algo.AlgorithmFamilyCodeSequence[0]) == ("123110", "DCM", "Artificial Intelligence")
        for b in ("roi_extractor", "organ_seg", "tumor_seg"):
            assert f"{b}={versions[b]}" in algo.AlgorithmParameters
    assert all(f"{b} {v}" in list(ds.SoftwareVersions) for b, v in versions.items())
    # a new series in the source's study, referencing the source series slice by slice
    sources = {}
    for f in source_folder.iterdir():
        s = pydicom.dcmread(f, stop_before_pixels=True)
        if s.get("Modality") == "CT" and "LOCALIZER" not in list(s.get("ImageType", [])):
            sources[s.SOPInstanceUID] = s
    first = next(iter(sources.values()))
    assert ds.StudyInstanceUID == first.StudyInstanceUID and ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID and ds.SeriesNumber == 1000 + int(first.get("SeriesNumber") or 0)
    assert ds.PatientID == first.PatientID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence} <= set(sources)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in sources[ref].ImagePositionPatient], atol=1e-3)
    return ds


def _hashes(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _flare23(*args, timeout=900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flare23", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("flare23: error:")]


def _main_fails(argv, capsys) -> str:
    from flare23.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flare23: error: "), err
    return err[0]


# --- fixtures --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_series(real_dicom_dir, tmp_path_factory) -> Path:
    """The real axial series (JPEG 2000) with the UIDs its anonymiser blanked given back."""
    return copy_series_with_uids(real_dicom_dir / "dicom", tmp_path_factory.mktemp("real") / "abdomen ct")


@pytest.fixture(scope="module")
def sagittal(real_ct_dir, tmp_path_factory) -> dict:
    """The real CT of ts_example_ct written as a sagittal DICOM series, with its FLARE label map."""
    ct = nib.load(str(real_ct_dir / "ct.nii.gz"))
    folder = tmp_path_factory.mktemp("sagittal") / "sagittal"
    write_dicom_volume(folder, np.asarray(ct.dataobj), ct.affine, slice_axis=0, flip_rows=True)
    label = nib.load(str(real_ct_dir / "label_flare.nii.gz"))
    return {"folder": folder, "ct": ct, "label": np.asarray(label.dataobj).astype(np.uint8), "label_affine": label.affine}


def every_label(label: np.ndarray) -> np.ndarray:
    """``label`` with a block of each FLARE label it lacks (kidneys, the left adrenal, tumor, ...), in its background."""
    out = label.copy()
    nx, ny, nz = out.shape
    missing = [i for i in FOREGROUND_IDS if not np.any(out == i)]
    for k, i in enumerate(missing):
        x0 = 4 + 9 * k
        block = (slice(x0, x0 + 6), slice(2, 8), slice(1 + k % max(1, nz - 4), min(nz, 1 + k % max(1, nz - 4) + 3)))
        out[block] = np.where(out[block] == 0, i, out[block])
    assert set(np.unique(out)) == {0, *FOREGROUND_IDS}
    return out


# --- the code table ----------------------------------------------------------------------------------------------------------
def _cid(name: str) -> dict[str, str]:
    from pydicom.sr.codedict import codes

    cid = getattr(codes, name)
    return {getattr(cid, kw).value: getattr(cid, kw).meaning for kw in cid.dir("")}


def test_the_code_table_has_one_entry_per_label_with_codes_of_the_standard():
    """Every FLARE label has its SNOMED CT codes, each a member of the DICOM context group it is used from."""
    assert sorted(LABEL_SNOMED) == list(FOREGROUND_IDS)
    categories, types, lateralities = _cid("cid7150"), _cid("cid7151"), _cid("cid244")
    for label, (category, kind, modifier) in LABEL_SNOMED.items():
        assert categories.get(category[0]) == category[1], (label, category)  # CID 7150 Segmentation Property Categories
        assert types.get(kind[0]) == kind[1], (label, kind)  # CID 7151 Segmentation Property Types
        if modifier is not None:
            assert lateralities.get(modifier[0]) == modifier[1], (label, modifier)  # CID 244 Laterality
        side = "right" if "right" in LABELS[label] else "left" if "left" in LABELS[label] else None
        assert (modifier[1].lower() if modifier else None) == side, label
    assert LABEL_SNOMED[14][0] == ("49755003", "Morphologically Abnormal Structure")
    assert LABEL_SNOMED[14][1] == ("108369006", "Neoplasm")


# --- the writer on its own: every label, two orientations ----------------------------------------------------------------
def test_round_trip_real_axial_series_every_label(real_series, real_dicom_dir, tmp_path):
    array, affine, _ = read_dicom_series(real_series)
    ref = nib.load(str(real_dicom_dir / "label_flare.nii.gz"))
    assert np.allclose(ref.affine, affine, atol=1e-3) and ref.shape == array.shape  # the label map is on this grid
    labels = every_label(np.asarray(ref.dataobj).astype(np.uint8))
    (tmp_path / "out").mkdir()
    nifti = save_nifti(labels, affine, tmp_path / "out" / "abdomen ct.nii.gz", dtype=np.uint8)  # what SaveLabeld writes
    before = _hashes(real_series)
    seg = write_dicom_seg(labels, affine, real_series, tmp_path / "out" / f"abdomen ct{SEG_SUFFIX}")
    assert _hashes(real_series) == before and not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    ours = nib.load(str(nifti))
    back, back_affine, attrs = dcmqi_read(seg, tmp_path / "dcmqi")
    assert_same_in_world(back, back_affine, np.asarray(ours.dataobj), ours.affine)
    assert sorted(attrs) == list(FOREGROUND_IDS)
    for label, s in attrs.items():  # dcmqi reads the codes too
        category, kind, modifier = LABEL_SNOMED[label]
        assert s["SegmentedPropertyCategoryCodeSequence"]["CodeValue"] == category[0]
        assert s["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == kind[0]
        assert s.get("SegmentedPropertyTypeModifierCodeSequence", {}).get("CodeValue") == (modifier[0] if modifier else None)
    check_segments(seg, FOREGROUND_IDS, real_series)


def test_round_trip_sagittal_series_written_from_a_real_ct(sagittal, tmp_path):
    folder, ct = sagittal["folder"], sagittal["ct"]
    array, affine, _ = read_dicom_series(folder)
    assert nib.aff2axcodes(affine) != nib.aff2axcodes(ct.affine)  # another orientation than the NIfTI's
    assert np.array_equal(in_grid(np.asarray(ct.dataobj), ct.affine, array.shape, affine), array)  # the series is the CT
    labels = in_grid(every_label(sagittal["label"]), sagittal["label_affine"], array.shape, affine)
    seg = write_dicom_seg(labels, affine, folder, tmp_path / f"sagittal{SEG_SUFFIX}")
    back, back_affine, attrs = dcmqi_read(seg, tmp_path / "dcmqi")
    assert sorted(attrs) == list(FOREGROUND_IDS)
    assert_same_in_world(back, back_affine, labels, affine)
    # and against the original RAS label map: the SEG of the sagittal series is the same anatomy in the same place
    assert_same_in_world(back, back_affine, every_label(sagittal["label"]), sagittal["label_affine"])
    check_segments(seg, FOREGROUND_IDS, folder)


def _octants(shape) -> np.ndarray:
    """A label map that tells every axis flip and permutation apart: labels 1..8 by octant, 0 on a border slab."""
    g = np.indices(shape)
    halves = [(g[a] >= max(1, shape[a] // 2)).astype(np.uint8) for a in range(3)]
    labels = (1 + halves[0] + 2 * halves[1] + 4 * halves[2]).astype(np.uint8)
    labels[0] = 0
    labels[:, :, -1] = np.where(labels[:, :, -1] == 5, 14, labels[:, :, -1])
    return labels


def test_round_trip_on_every_dicom_kind_of_the_field(tmp_path):
    """The reliability corpus's DICOM series (no extension, InstanceNumber from 0, origin at the corner, JPEG 2000, an SR
    or a localizer beside the slices): each SEG comes back through dcmqi equal to the label map; blank UIDs are refused."""
    kinds = dicom_corpus(tmp_path / "in")
    before = _hashes(tmp_path / "in")
    checked = []
    for name, kind in kinds.items():
        if kind.expect not in (VALID, WARNING):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skipped SR / localizer (test_corpus.py checks those warnings)
            array, affine, _ = read_case(Case(kind.case, kind.path, "dicom"))
        labels = _octants(array.shape)
        out = tmp_path / "out" / f"{name}{SEG_SUFFIX}"
        out.parent.mkdir(exist_ok=True)
        if name == "dicom_blank_uids":
            with pytest.raises(Flare23Error, match="is empty") as info:
                write_dicom_seg(labels, affine, kind.path, out)
            assert str(kind.path) in str(info.value) and "\n" not in str(info.value) and not out.exists()
            continue
        write_dicom_seg(labels, affine, kind.path, out)
        back, back_affine, _ = dcmqi_read(out, tmp_path / "dcmqi" / name)
        assert_same_in_world(back, back_affine, labels, affine)
        check_segments(out, np.unique(labels[labels > 0]), kind.path)
        checked.append(name)
    assert sorted(checked) == sorted(
        ["dicom_good", "dicom_no_extension", "dicom_instance_0", "dicom_origin_corner", "dicom_jpeg2000", "dicom_with_sr",
         "dicom_with_localizer"]
    )  # fmt: skip
    assert _hashes(tmp_path / "in") == before


def test_writer_refuses_a_foreign_grid_an_unknown_label_and_the_series_folder_and_skips_an_empty_result(tmp_path):
    folder = tmp_path / "series"
    write_dicom_series(folder, body((24, 24, 4)))
    array, affine, _ = read_dicom_series(folder)
    labels = _octants(array.shape)
    with pytest.raises(Flare23Error, match="not the series'"):
        write_dicom_seg(labels[:, :, :3], affine, folder, tmp_path / "a.seg.dcm")
    shifted = affine.copy()
    shifted[:3, 3] += 1.0
    with pytest.raises(Flare23Error, match="not the series'"):
        write_dicom_seg(labels, shifted, folder, tmp_path / "a.seg.dcm")
    with pytest.raises(Flare23Error, match="no FLARE label"):
        write_dicom_seg(np.where(labels == 3, 20, labels).astype(np.uint8), affine, folder, tmp_path / "a.seg.dcm")
    with pytest.raises(Flare23Error, match="inside the source series folder"):
        write_dicom_seg(labels, affine, folder, folder / "a.seg.dcm")
    with pytest.warns(UserWarning, match="nothing was segmented"):
        assert write_dicom_seg(np.zeros_like(labels), affine, folder, tmp_path / "a.seg.dcm") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]


def test_save_dicom_segd_formats(tmp_path):
    """The pipeline's writers: nifti writes the NIfTI only, both adds the SEG, dicom-seg writes the SEG only; a NIfTI input is refused."""
    import torch

    from flare23.inference.cases import ReadCased, SaveLabeld
    from flare23.inference.dicom_seg import SaveDicomSegd

    folder = tmp_path / "case a"
    write_dicom_series(folder, body((24, 24, 4)))
    d = ReadCased(keys="image")({"image": str(folder), "kind": "dicom", "name": "case a"})
    labels = torch.as_tensor(_octants(tuple(d["image"].shape[1:])))[None]
    for fmt, files in (
        ("nifti", ["case a.nii.gz"]),
        ("both", ["case a.nii.gz", "case a.seg.dcm"]),
        ("dicom-seg", ["case a.seg.dcm"]),
    ):
        out = tmp_path / f"out_{fmt}"
        data = {"image": d["image"], "pred": labels}
        SaveDicomSegd(keys="pred", output_dir=str(out), output_format=fmt)(SaveLabeld(keys="pred", output_dir=str(out), output_format=fmt)(data))
        assert sorted(p.name for p in out.iterdir()) == files, fmt
    nifti = tmp_path / "b.nii.gz"
    save_nifti(body((24, 24, 4)), np.eye(4), nifti)
    d = ReadCased(keys="image")({"image": str(nifti), "kind": "nifti", "name": "b"})
    with pytest.raises(Flare23Error, match="needs a DICOM series"):
        SaveDicomSegd(keys="pred", output_dir=str(tmp_path / "x"), output_format="both")({"image": d["image"], "pred": labels})
    with pytest.raises(Flare23Error, match="expected one of nifti, dicom-seg, both"):
        SaveDicomSegd(output_format="dicom")


# --- flare23 segment --format ----------------------------------------------------------------------------------------------
def test_segment_both_on_the_real_series(real_series, tmp_path):
    """``--format both`` into a folder: the NIfTI result and its SEG, equal through dcmqi; several labels present."""
    before = _hashes(real_series)
    out = tmp_path / "out"
    r = _flare23("segment", "-i", real_series, "-o", out, "--format", "both", "--device", "cpu", *_tiny_args())
    assert r.returncode == 0, r.stderr[-3000:]
    name = real_series.name
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{name}.nii.gz", f"{name}{SEG_SUFFIX}", "efficiency.csv", "timings.csv", f"{name}_roi.json"]
    )
    assert f"wrote {out / (name + SEG_SUFFIX)}" in r.stdout
    ours = nib.load(str(out / f"{name}.nii.gz"))
    values = np.asarray(ours.dataobj)
    present = [int(v) for v in np.unique(values) if v]
    assert len(present) >= 2, f"the tiny random networks segmented only {present}: the round trip would prove little"
    back, back_affine, attrs = dcmqi_read(out / f"{name}{SEG_SUFFIX}", tmp_path / "dcmqi")
    assert sorted(attrs) == present
    assert_same_in_world(back, back_affine, values, ours.affine)
    check_segments(out / f"{name}{SEG_SUFFIX}", present, real_series)
    assert _hashes(real_series) == before


def test_segment_both_on_a_sagittal_series_to_named_files(sagittal, tmp_path):
    """One case to ``-o x.nii.gz --format both``: ``x.nii.gz`` and ``x.seg.dcm`` beside it, equal through dcmqi."""
    dst = tmp_path / "out" / "x.nii.gz"
    r = _flare23("segment", "-i", sagittal["folder"], "-o", dst, "--format", "both", "--device", "cpu", *_tiny_args())
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in dst.parent.iterdir()) == sorted(
        ["x.nii.gz", "x.seg.dcm", "x_efficiency.csv", "x_timings.csv", "x_roi.json"]
    )
    ours = nib.load(str(dst))
    values = np.asarray(ours.dataobj)
    present = [int(v) for v in np.unique(values) if v]
    assert len(present) >= 2, present
    back, back_affine, _ = dcmqi_read(dst.parent / "x.seg.dcm", tmp_path / "dcmqi")
    assert_same_in_world(back, back_affine, values, ours.affine)
    check_segments(dst.parent / "x.seg.dcm", present, sagittal["folder"])


def test_segment_dicom_seg_only_writes_no_nifti(tmp_path):
    """``--format dicom-seg -o y.dcm`` (networks that answer spleen everywhere): the SEG and the side files, no NIfTI."""
    folder = tmp_path / "in" / "series"
    write_dicom_series(folder, body((64, 64, 6)), jpeg2000=True)
    ckpt = constant_checkpoints(tmp_path / "ckpt", {"roi": TINY["roi_overrides"], "organ": TINY["organ_overrides"],
                                                    "tumor": TINY["tumor_overrides"]}, {"roi": 1, "organ": 3, "tumor": 0})  # fmt: skip
    args = [a for a in _tiny_args() if a not in ("--load_pretrain", "false")]
    dst = tmp_path / "out" / "y.dcm"
    r = _flare23("segment", "-i", folder, "-o", dst, "--format", "dicom-seg", "--roi_ckpt", ckpt["roi"],
                 "--organ_ckpt", ckpt["organ"], "--tumor_ckpt", ckpt["tumor"], *args)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in dst.parent.iterdir()) == ["y.dcm", "y_efficiency.csv", "y_roi.json", "y_timings.csv"]
    array, affine, _ = read_dicom_series(folder)
    back, back_affine, attrs = dcmqi_read(dst, tmp_path / "dcmqi")
    assert sorted(attrs) == [3]
    assert_same_in_world(back, back_affine, np.full(array.shape, 3, np.uint8), affine)
    check_segments(dst, [3], folder)


def test_format_errors_are_one_line_before_any_work(real_dicom_dir, real_series, tmp_path, capsys):
    nifti = tmp_path / "in" / "a_0000.nii.gz"
    nifti.parent.mkdir()
    save_nifti(body(), np.eye(4), nifti)
    blank = tmp_path / "in" / "blank"
    write_dicom_series(blank, body((24, 24, 4)), blank_uids=True)
    before = _hashes(tmp_path / "in")
    out = tmp_path / "out"
    line = _main_fails(["segment", "-i", nifti, "-o", out, "--format", "dicom-seg"], capsys)
    assert str(nifti) in line and "needs DICOM series" in line
    line = _main_fails(["segment", "-i", tmp_path / "in", "-o", out, "--format", "both"], capsys)  # a NIfTI among series
    assert str(nifti) in line
    line = _main_fails(["segment", "-i", blank, "-o", out, "--format", "both"], capsys)
    assert str(blank) in line and "UID is empty" in line and "--format nifti" in line
    shared = real_dicom_dir / "dicom"  # the real series as its anonymiser left it
    line = _main_fails(["segment", "-i", shared, "-o", out, "--format", "dicom-seg"], capsys)
    assert str(shared) in line and "UID is empty" in line
    line = _main_fails(["segment", "-i", real_series, "-o", real_series, "--format", "both"], capsys)
    assert "the input folder itself" in line
    line = _main_fails(["segment", "-i", real_series.parent, "-o", real_series, "--format", "both"], capsys)
    assert "inside the input series folder" in line
    line = _main_fails(["segment", "-i", real_series, "-o", out / "x.dcm"], capsys)
    assert "x.dcm" in line and "--format dicom-seg" in line
    line = _main_fails(["segment", "-i", real_series, "-o", out / "x.nii.gz", "--format", "dicom-seg"], capsys)
    assert "x.nii.gz" in line and ".seg.dcm" in line
    line = _main_fails(["segment", "-i", real_series, "-o", out, "--format", "dcm"], capsys)
    assert "expected one of nifti, dicom-seg, both" in line
    line = _main_fails(["segment", "-i", real_series, "-o", out, "--format", "both", "--output_format", "nifti"], capsys)
    assert "disagree" in line
    assert not out.exists() and _hashes(tmp_path / "in") == before
    assert not [p for p in real_series.iterdir() if not p.name.startswith("CT.")]
