"""The single source of truth for every FLARE 2023 constant used by the project.

Every module and every bundle config reads labels, tolerances, post-processing lists, spacings,
patch sizes, network hyper-parameters and normalisation defaults from here (bundle configs as
``"$flare23.constants.NAME"``). Values follow ``../shared/METHOD.md``.

Axis convention: METHOD.md and the paper give spacings and patch sizes as (z, y, x), the
SimpleITK / nnU-Net order. MONAI arrays after ``Orientationd(axcodes="RAS")`` are ordered
(x, y, z) = (right-left, anterior-posterior, inferior-superior). Names ending in ``_ZYX`` keep the
paper's order; names ending in ``_XYZ`` are the same numbers in MONAI's order and are what the
bundle configs use.
"""

from __future__ import annotations

# --- labels (METHOD.md section 1) -------------------------------------------------------------
LABELS: dict[int, str] = {
    0: "background",
    1: "liver",
    2: "right kidney",
    3: "spleen",
    4: "pancreas",
    5: "aorta",
    6: "inferior vena cava",
    7: "right adrenal gland",
    8: "left adrenal gland",
    9: "gallbladder",
    10: "esophagus",
    11: "stomach",
    12: "duodenum",
    13: "left kidney",
    14: "tumor",
}
#: snake_case names used in CSV columns and JSON keys.
LABEL_KEYS: dict[int, str] = {i: n.replace(" ", "_") for i, n in LABELS.items()}
NAME_TO_ID: dict[str, int] = {n: i for i, n in LABEL_KEYS.items()}

NUM_CLASSES = 15  # background + 13 organs + tumor: channels of organ and tumor models
BACKGROUND = 0
ORGAN_IDS: tuple[int, ...] = tuple(range(1, 14))
TUMOR_ID = 14
FOREGROUND_IDS: tuple[int, ...] = ORGAN_IDS + (TUMOR_ID,)
#: Organs where the tumors of FLARE 2023 lie (liver, right kidney, spleen, pancreas, gallbladder, stomach, duodenum,
#: left kidney): with ``tumor_windows="hosts"`` the tumor model runs only near them or near the organ model's tumor.
TUMOR_HOST_IDS: tuple[int, ...] = (1, 2, 3, 4, 9, 11, 12, 13)

#: MONAI-style ``channel_def`` of the 15-channel models (metadata.json).
CHANNEL_DEF: dict[str, str] = {str(i): n for i, n in LABELS.items()}

#: SNOMED CT (scheme ``SCT``) codes of each label in a DICOM Segmentation, as ``(code value, code meaning)``:
#: ``{id: (property category, property type, type modifier or None)}``. Categories come from DICOM CID 7150
#: "Segmentation Property Categories", types from CID 7151 "Segmentation Property Types", the laterality
#: modifier from CID 244 "Laterality" (DICOM codes "right kidney" as Kidney + Right); the values and
#: meanings are those of pydicom's copy of the standard's code tables (tests/test_dicom_seg.py checks
#: each against ``pydicom.sr.codedict.codes``). CID 7150 now codes "Anatomical Structure" as 91723000
#: (older tools wrote 123037004, now SNOMED's "Body structure"); 49755003's meaning is "Morphologically
#: Abnormal Structure" (formerly "Morphologically Altered Structure").
SCT_ANATOMICAL_STRUCTURE = ("91723000", "Anatomical Structure")
SCT_MORPHOLOGICALLY_ABNORMAL_STRUCTURE = ("49755003", "Morphologically Abnormal Structure")
SCT_RIGHT = ("24028007", "Right")
SCT_LEFT = ("7771000", "Left")
LABEL_SNOMED: dict[int, tuple[tuple[str, str], tuple[str, str], tuple[str, str] | None]] = {
    1: (SCT_ANATOMICAL_STRUCTURE, ("10200004", "Liver"), None),
    2: (SCT_ANATOMICAL_STRUCTURE, ("64033007", "Kidney"), SCT_RIGHT),
    3: (SCT_ANATOMICAL_STRUCTURE, ("78961009", "Spleen"), None),
    4: (SCT_ANATOMICAL_STRUCTURE, ("15776009", "Pancreas"), None),
    5: (SCT_ANATOMICAL_STRUCTURE, ("15825003", "Aorta"), None),
    6: (SCT_ANATOMICAL_STRUCTURE, ("64131007", "Inferior vena cava"), None),
    7: (SCT_ANATOMICAL_STRUCTURE, ("23451007", "Adrenal gland"), SCT_RIGHT),
    8: (SCT_ANATOMICAL_STRUCTURE, ("23451007", "Adrenal gland"), SCT_LEFT),
    9: (SCT_ANATOMICAL_STRUCTURE, ("28231008", "Gallbladder"), None),
    10: (SCT_ANATOMICAL_STRUCTURE, ("32849002", "Esophagus"), None),
    11: (SCT_ANATOMICAL_STRUCTURE, ("69695003", "Stomach"), None),
    12: (SCT_ANATOMICAL_STRUCTURE, ("38848004", "Duodenum"), None),
    13: (SCT_ANATOMICAL_STRUCTURE, ("64033007", "Kidney"), SCT_LEFT),
    14: (SCT_MORPHOLOGICALLY_ABNORMAL_STRUCTURE, ("108369006", "Neoplasm"), None),
}
#: Display colour (RGB) of each label in a DICOM Segmentation (RecommendedDisplayCIELabValue) and in viewers.
LABEL_COLORS_RGB: dict[int, tuple[int, int, int]] = {
    1: (221, 130, 101), 2: (185, 102, 83), 3: (157, 108, 162), 4: (249, 180, 111), 5: (224, 97, 76),
    6: (0, 151, 206), 7: (244, 186, 150), 8: (220, 160, 120), 9: (139, 150, 98), 10: (211, 171, 143),
    11: (216, 132, 105), 12: (255, 225, 160), 13: (160, 90, 70), 14: (255, 255, 0),
}  # fmt: skip

#: Labels that FLARE's partial annotations carry in the "five organs + tumor" subset.
PARTIAL_FIVE_ORGANS: tuple[int, ...] = (1, 2, 3, 4, 13)

# --- evaluation (METHOD.md section 6) ---------------------------------------------------------
#: NSD tolerance in mm per label id.
NSD_TOLERANCE_MM: dict[int, float] = {
    1: 5.0, 2: 3.0, 3: 3.0, 4: 5.0, 5: 2.0, 6: 2.0, 7: 2.0,
    8: 2.0, 9: 2.0, 10: 3.0, 11: 5.0, 12: 7.0, 13: 3.0, 14: 2.0,
}
#: Tubular structures whose masks are restricted to the reference's z-range before scoring.
SLAB_RESTRICTED_IDS: tuple[int, ...] = (5, 6, 10)
#: NSD is set to 0 when DSC is below this (the challenge used 0.1, organisers' code 0.2).
NSD_DSC_CUTOFF = 0.1

# --- post-processing (METHOD.md section 5, step 6) --------------------------------------------
KEEP_LARGEST_IDS: tuple[int, ...] = (1, 3, 4, 7, 8, 11)
REMOVE_SMALL_IDS: tuple[int, ...] = (2, 9, 13)
SMALL_COMPONENT_FRACTION = 0.1
POSTPROCESS_CONNECTIVITY = 26

# --- ROI extractor (METHOD.md section 3) ------------------------------------------------------
ROI_INPLANE_STRIDE = 4
ROI_SLICE_TARGET_MM = 5.0
ROI_CLIP = (-1024.0, 1024.0)
ROI_MAX_WHOLE_SLICES = 240
ROI_PAD_MULTIPLE = 16
#: Spatial axes (RAS order: 0 = x, 1 = y, 2 = z) of the ROI bundle's extra mirrored passes, whose
#: probabilities are averaged with the plain pass (not in the paper). One pass mirrored along y was
#: chosen on the validation phantoms (ROI Dice 0.9008 -> 0.9073); the pipeline skips it by default.
ROI_MIRROR_AXES: tuple[int, ...] = (1,)
ROI_PATCH_ZYX = (80, 128, 128)
ROI_PATCH_XYZ = (128, 128, 80)
ROI_MARGIN_FEET_MM = 40.0
ROI_MARGIN_HEAD_MM = 20.0
ROI_MARGIN_INPLANE_MM = 5.0
ROI_NUM_CLASSES = 2
#: Training context of the fine models: each sample is cropped to its labels' box widened by a margin
#: drawn uniformly in [low, high] mm per side (``flare23.models.sampling.RandRoiContextCropd``), to show the
#: networks what the ROI box gives them at inference (the margins above plus the ROI model's error,
#: up to about 8 cm further towards the feet than the labels on the held-out phantoms). ``flare23 crop`` keeps ``high``.
CONTEXT_MARGINS_MM: dict[str, tuple[float, float]] = {"feet": (0.0, 120.0), "head": (0.0, 60.0), "inplane": (0.0, 30.0)}
ROI_ENCODER_DEPTHS = (2, 2, 4, 6, 4)
ROI_STRIDES = (1, 2, 2, 2, 2)

# --- fine models (METHOD.md section 4) --------------------------------------------------------
ORGAN_SPACING_ZYX = (2.5, 0.82, 0.82)
ORGAN_SPACING_XYZ = (0.82, 0.82, 2.5)
TUMOR_SPACING_ZYX = (4.0, 1.2, 1.2)
TUMOR_SPACING_XYZ = (1.2, 1.2, 4.0)
ORGAN_PATCH_ZYX = (64, 128, 224)
ORGAN_PATCH_XYZ = (224, 128, 64)
TUMOR_PATCH_ZYX = (32, 128, 192)
TUMOR_PATCH_XYZ = (192, 128, 32)
FILTERS = (32, 64, 128, 256, 320, 320)
KERNELS_XYZ = ((3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
ORGAN_STRIDES_XYZ = ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
TUMOR_STRIDES_XYZ = ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 1))
ORGAN_OVERLAP = 0.2
TUMOR_OVERLAP = 0.5

# --- optimisation (METHOD.md sections 3 and 4) ------------------------------------------------
LEARNING_RATE = 0.01
MOMENTUM = 0.95
POLY_POWER = 0.9
BATCH_SIZE = 2
EPOCH_LENGTH = 250
FINETUNE_LEARNING_RATE = 1e-4
FINETUNE_BATCH_SIZE = 4

# --- CT normalisation fingerprints (METHOD.md section 2) --------------------------------------
FINGERPRINT_DEFAULTS: dict[str, dict[str, float]] = {
    "organ": {"clip_low": -965.0, "clip_high": 276.0, "mean": 79.65, "std": 139.34},
    "tumor": {"clip_low": -967.0, "clip_high": 291.0, "mean": 83.56, "std": 136.62},
}

#: Suffix of the single CT channel in the FLARE / nnU-Net layout.
IMAGE_SUFFIX = "_0000"
