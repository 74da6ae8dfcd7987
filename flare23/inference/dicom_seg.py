"""Results as DICOM Segmentation objects: ``flare23 segment --format dicom-seg|both`` and the pipeline's ``output_format``.

Hospital viewers, PACS and annotation tools (3D Slicer, OHIF, MONAI Label's DICOMweb mode) read
DICOM SEG, not NIfTI. :func:`write_dicom_seg` turns the label map of a DICOM series into one SEG
instance, written with highdicom; :class:`SaveDicomSegd` does it in the pipeline bundle's
postprocessing, after the NIfTI writer (``output_format``: ``nifti`` (default, nothing to do here),
``dicom-seg`` (the SEG only: the NIfTI that the writer before made of the same labels is removed),
``both``).

Decisions:

* **BINARY, not LABELMAP.** A BINARY SEG (Segmentation Storage, 1.2.840.10008.5.1.4.1.1.66.4, one
  1-bit frame per segment and slice) has been read by every DICOM viewer, PACS and toolkit since 2011:
  dcmqi (so 3D Slicer's QuantitativeReporting import), OHIF, highdicom, DCMTK. A LABELMAP SEG (one
  8-bit frame per slice) is a new SOP class (Label Map Segmentation Storage, 66.7, from 2024) that
  dcmqi 1.5.7 reads, but that a PACS must be configured to accept and older Slicer / OHIF releases
  do not open. Its advantages (about 10 x faster to write, one frame per slice) are not worth a
  result that some sites cannot store. Not fractional: the cascade's answer is a label map.
  Uncompressed (Explicit VR Little Endian): highdicom allows only JPEG 2000 besides that for
  BINARY, which older readers decode less often; empty frames (a segment absent from a slice) are
  left out (highdicom's ``omit_empty_frames``), which keeps the file small.
* **One segment per label present**, numbered 1, 2, ... in FLARE label order, labelled with the
  FLARE name (``flare23.constants.LABELS``; ``SegmentDescription`` "FLARE label <id>"), with the
  SNOMED CT category, type and laterality modifier of ``flare23.constants.LABEL_SNOMED`` (the one
  code table, beside the label names) and the display colour of ``LABEL_COLORS_RGB``. An empty
  result gives no SEG (a SEG must hold a segment) and a warning naming the case.
* **Algorithm identification**: ``SegmentAlgorithmType`` AUTOMATIC, algorithm family "Artificial
  Intelligence" (DCM 123110), name "flare23 pipeline", version the pipeline bundle's, parameters
  and the SEG's ``SoftwareVersions`` naming each bundle with its version (from each bundle's
  ``configs/metadata.json``, :func:`flare23.models.spec.bundle_metadata`) and the package version.
* **A new series in the source's study**: patient, study and frame of reference are the source's;
  a new ``SeriesInstanceUID``, ``SeriesNumber`` = the source's + 1000 (1000 when it has none),
  ``ReferencedSeriesSequence`` naming the source series and, per frame, the source slice it was
  derived from (``DerivationImageSequence``; highdicom). A source series without the UIDs that
  these references need (an anonymiser that blanked them) is refused in one line naming the file:
  a SEG whose references point nowhere cannot be matched to its images by any viewer.
* **Where**: ``<output>/<case>.seg.dcm`` (or the ``.dcm`` file named by ``-o``), written to a
  temporary file beside it and renamed into place (:func:`flare23.io.atomic_path`); never inside the
  source series folder (a SEG there would become part of the input the next time it is read).

The slices are selected and ordered exactly as the reader did (:func:`flare23.data.dicom.dicom_series_headers`,
headers only), and the label map must have the series' grid (shape and affine): anything else is an error,
never a silently shifted SEG. The round trip is checked by a reader we did not write: dcmqi's
``segimage2itkimage`` turns the SEG back into a volume equal to the NIfTI result voxel for voxel in world
coordinates (``tests/test_dicom_seg.py``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from flare23.errors import Flare23Error
from flare23.inference.cases import case_label_maps, check_output_format, wants_seg
from flare23.roi.transforms import FileWriterd

logger = logging.getLogger(__name__)

#: Values of ``--format`` / the pipeline's ``output_format``.
#: File name ending of a DICOM SEG result: ``<case>.seg.dcm``.
SEG_SUFFIX = ".seg.dcm"
#: The SEG's SeriesNumber is the source's plus this.
SERIES_NUMBER_OFFSET = 1000
MANUFACTURER = "flare23 project"
ALGORITHM_NAME = "flare23 pipeline"
SERIES_DESCRIPTION = "flare23 abdominal organs and tumor (AI)"
CONTENT_LABEL = "FLARE23"  # CS, at most 16 characters
#: Type 2 attributes that highdicom copies from the source; a series that lacks them gets them empty in the SEG.
_TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)  # fmt: skip


# --- what the SEG says about the algorithm ---------------------------------------------------------------------------
def bundle_versions(bundle_dirs) -> list[tuple[str, str]]:
    """``[(bundle folder name, version)]`` from each bundle's ``configs/metadata.json`` (missing ones left out)."""
    from flare23.models.spec import bundle_metadata

    found = []
    for folder in bundle_dirs or ():
        path = Path(str(folder)).resolve()
        version = bundle_metadata(path).get("version")
        if version:
            found.append((path.name, str(version)))
    return found


def default_bundle_dirs() -> list[Path]:
    from flare23.bundles import PACKAGE_BUNDLES_DIR

    return [PACKAGE_BUNDLES_DIR / b for b in ("pipeline", "roi_extractor", "organ_seg", "tumor_seg")]


def algorithm_identification(bundle_dirs=None) -> dict:
    """Name, version, parameters and software versions that identify the algorithm in the SEG."""
    import flare23

    versions = bundle_versions(default_bundle_dirs() if bundle_dirs is None else bundle_dirs)
    named = dict(versions)
    pipeline = named.get("pipeline", "unknown")
    return {
        "name": ALGORITHM_NAME,
        "version": pipeline,
        "parameters": {name: version for name, version in versions if name != "pipeline"} or None,
        "software_versions": tuple(f"{name} {version}" for name, version in versions) + (f"flare23 {flare23.__version__}",),
    }


# --- the source series ------------------------------------------------------------------------------------------------
def _uid(ds, keyword: str, file: Path) -> str:
    from pydicom.uid import UID

    value = str(ds.get(keyword, "") or "").strip()
    if not value:
        raise Flare23Error(
            f"{file}: {keyword} is empty (an anonymiser blanked the UIDs?); a DICOM SEG must reference its source by UID: "
            "use --format nifti, or export the series with its UIDs"
        )
    if not UID(value).is_valid:
        raise Flare23Error(f"{file}: {keyword} {value!r} is not a valid DICOM UID; a DICOM SEG cannot reference it")
    return value


def check_seg_source(series) -> None:
    """Refuse (one line naming the file) a series that a SEG cannot reference: missing or invalid study, series,
    SOP class, SOP instance or frame of reference UIDs, slices of several studies, duplicate SOP instance UIDs."""
    study = frame = None
    seen: dict[str, Path] = {}
    for f, ds in series.slices:
        for keyword in ("SOPClassUID", "SeriesInstanceUID"):
            _uid(ds, keyword, f)
        this_study, this_frame = _uid(ds, "StudyInstanceUID", f), _uid(ds, "FrameOfReferenceUID", f)
        if study is None:
            study, frame = this_study, this_frame
        elif this_study != study or this_frame != frame:
            which = "StudyInstanceUID" if this_study != study else "FrameOfReferenceUID"
            raise Flare23Error(f"{f}: {which} differs from the other slices of {series.folder}; a SEG needs one")
        sop = _uid(ds, "SOPInstanceUID", f)
        if sop in seen:
            raise Flare23Error(f"{f}: the same SOPInstanceUID as {seen[sop].name}; a SEG cannot reference these slices")
        seen[sop] = f


def seg_source(series_folder):
    """The slices of ``series_folder`` as the reader ordered them, checked for a SEG (:func:`check_seg_source`)."""
    from flare23.data.dicom import dicom_series_headers

    series = dicom_series_headers(series_folder)
    check_seg_source(series)
    return series


def _code(pair):
    from pydicom.sr.coding import Code

    return Code(pair[0], "SCT", pair[1])


def segment_descriptions(labels_present, algorithm: dict) -> list:
    """highdicom segment descriptions of ``labels_present`` (FLARE ids), numbered 1, 2, ... in that order."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from flare23.constants import LABEL_COLORS_RGB, LABEL_SNOMED, LABELS

    algo = hd.AlgorithmIdentificationSequence(
        name=algorithm["name"],
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm["version"],
        parameters=algorithm.get("parameters"),
    )
    descriptions = []
    for number, label in enumerate(labels_present, start=1):
        category, kind, modifier = LABEL_SNOMED[label]
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=LABELS[label],
            segmented_property_category=_code(category),
            segmented_property_type=_code(kind),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            display_color=hd.color.CIELabColor.from_rgb(*LABEL_COLORS_RGB[label]),
        )
        desc.SegmentDescription = f"FLARE label {label}"
        if modifier is not None:  # Segmented Property Type Modifier Code Sequence sits inside the type's item
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(_code(modifier))
            ]
        descriptions.append(desc)
    return descriptions


def write_dicom_seg(
    labels: np.ndarray, affine: np.ndarray, series_folder, out_path, bundle_dirs=None, series=None
) -> Path | None:
    """Write the label map ``labels`` of the DICOM series in ``series_folder`` as a BINARY DICOM SEG at ``out_path``.

    ``labels`` (uint8 FLARE ids) and ``affine`` are the result on the series' grid, as
    :func:`flare23.data.dicom.read_dicom_series` made it (array axes and RAS+ affine); ``series``,
    when given, is the already checked :func:`seg_source` of the folder. Returns the path written, or
    None (with a warning) when no label is present. Written atomically; never inside the series
    folder. Every problem is a one-line :class:`Flare23Error` naming the file.
    """
    import highdicom as hd

    from flare23.constants import LABEL_SNOMED
    from flare23.data.dicom import volume_to_frames
    from flare23.io import atomic_path

    series_folder, out_path = Path(series_folder), Path(out_path)
    if out_path.parent.resolve() == series_folder.resolve():
        raise Flare23Error(
            f"{out_path}: inside the source series folder; the SEG would become part of the input series: choose another output folder"
        )
    series = series if series is not None else seg_source(series_folder)
    labels = np.asarray(labels)
    while labels.ndim > 3 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.shape != tuple(series.shape) or not np.allclose(np.asarray(affine, dtype=float), series.affine, atol=1e-3):
        raise Flare23Error(
            f"{series_folder}: the result's grid (shape {tuple(labels.shape)}) is not the series' (shape {tuple(series.shape)}, "
            "as the reader orders its slices); no SEG written"
        )
    if labels.dtype != np.uint8:
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise Flare23Error(f"{series_folder}: label values outside 0..255; no SEG written")
        labels = labels.astype(np.uint8)
    # DICOM frames (slices, rows, columns) in the slices' order, C-contiguous: highdicom compares each plane with each
    # segment number, 8 x slower on the strided view. Counted and relabelled plane by plane (a whole-volume bincount
    # would cast 8 bytes per voxel).
    frames = np.array(volume_to_frames(labels), dtype=np.uint8, order="C", copy=True)  # never a view of the caller's
    seen = np.zeros(256, dtype=bool)
    for plane in frames:
        seen |= np.bincount(plane.reshape(-1), minlength=256) > 0
    present = [int(v) for v in np.flatnonzero(seen) if v != 0]
    unknown = [v for v in present if v not in LABEL_SNOMED]
    if unknown:
        raise Flare23Error(f"{series_folder}: label(s) {unknown} are no FLARE label (1..14); no SEG written")
    if not present:
        warnings.warn(
            f"{series_folder}: nothing was segmented (all background); no DICOM SEG written (a SEG needs a segment)",
            UserWarning,
            stacklevel=2,
        )
        return None
    if present != list(range(1, len(present) + 1)):  # segment numbers must be 1, 2, ...: FLARE ids -> segment numbers
        lut = np.zeros(256, dtype=np.uint8)
        lut[present] = np.arange(1, len(present) + 1, dtype=np.uint8)
        for plane in frames:
            plane[...] = lut[plane]

    sources = [ds for _, ds in series.slices]
    for ds in sources:  # in memory only: highdicom copies these type 2 attributes and needs them present
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    try:
        number = int(sources[0].get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    algorithm = algorithm_identification(bundle_dirs)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segment_descriptions(present, algorithm),
            series_instance_uid=hd.UID(),
            series_number=SERIES_NUMBER_OFFSET + max(number, 0),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=ALGORITHM_NAME,
            software_versions=list(algorithm["software_versions"]),
            device_serial_number=f"flare23-{algorithm['version']}",
            series_description=SERIES_DESCRIPTION,
            content_label=CONTENT_LABEL,
            content_description="FLARE 2023 abdominal organs and tumor",
            content_creator_name="flare23^",
            omit_empty_frames=True,
        )
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom's checks of the source attributes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Flare23Error(f"{series.slices[0][0]}: cannot build a DICOM SEG from this series ({first})") from None
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    logger.info("wrote DICOM SEG %s (%d segments, %d frames)", out_path, len(present), int(seg.NumberOfFrames))
    return out_path


# --- the pipeline's postprocessing ------------------------------------------------------------------------------------
class SaveDicomSegd(FileWriterd):
    """Write ``d[key]`` (the label map of a DICOM series, ``(1, X, Y, Z)``) as ``output_dir/<case><postfix>.seg.dcm``.

    Placed after :class:`flare23.inference.cases.SaveLabeld` in the pipeline's postprocessing:
    ``output_format`` ``nifti`` does nothing, ``both`` and ``dicom-seg`` write the SEG (the NIfTI writer,
    given the same ``output_format``, writes the NIfTI for ``nifti`` and ``both`` only). A case whose input is
    not a DICOM series, or whose series cannot be referenced, is a one-line error naming it
    (``flare23 segment`` checks all of them before any work). ``bundles``: the bundle folders named,
    with their versions, in the SEG (default: the project's four). A
    :class:`~flare23.roi.transforms.FileWriterd`: MONAI Label drops it, a request leaves no file.
    """

    def __init__(
        self,
        keys="pred",
        output_dir: str = "output",
        meta_key: str = "image",
        output_format: str = "nifti",
        output_postfix: str = "",
        bundles=None,
    ):
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.meta_key = meta_key
        self.output_format = check_output_format(output_format)
        self.output_postfix = output_postfix
        self.bundles = list(bundles) if bundles is not None else None
        self.written: list[Path] = []

    def __call__(self, data):
        from flare23.io import ensure_output_dir

        d = dict(data)
        if not wants_seg(self.output_format):
            return d
        ref = d[self.meta_key]
        if ref.meta.get("error"):
            return d  # a failed case: nothing is written
        source = Path(str(ref.meta.get("filename_or_obj", "")))
        name = str(ref.meta.get("case") or source.name)
        affine = np.asarray(ref.affine.detach().cpu().numpy(), dtype=float)
        for labels in case_label_maps(d, self.key_iterator(d)):
            if not source.is_dir():
                raise Flare23Error(
                    f"{source}: output_format {self.output_format} needs a DICOM series as input, this is a NIfTI file "
                    "(use output_format nifti)"
                )
            ensure_output_dir(self.output_dir)
            out = write_dicom_seg(labels, affine, source, self.output_dir / f"{name}{self.output_postfix}{SEG_SUFFIX}",
                                  bundle_dirs=self.bundles)  # fmt: skip
            if out is not None:
                self.written.append(out)
        return d
