"""flare23/constants.py pinned to the numbers of ../shared/METHOD.md.

The numbers are written here as METHOD.md writes them ((z, y, x) order, names), not read from
METHOD.md at run time: changing a constant means changing this test too, and either METHOD.md or a
recorded decision. Each test cites its METHOD.md section; where the project departs from METHOD.md
on purpose, the comment cites the **Decision** (METHOD.md's "paper and code disagree" notes).
The last tests pin the METHOD.md numbers that are defined outside constants.py, where they are defined.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from flare23 import constants as C

ROOT = Path(__file__).resolve().parents[1]


def xyz(zyx):
    """METHOD.md's (z, y, x) -> the (x, y, z) order of the ``_XYZ`` constants (RAS arrays)."""
    return tuple(reversed(tuple(zyx)))


def raw_config(bundle: str, name: str) -> dict:
    return json.loads((ROOT / "bundles" / bundle / "configs" / name).read_text())


# --- METHOD.md section 1: labels ---------------------------------------------------------------------------------------
def test_labels_section_1():
    assert C.LABELS == {
        0: "background", 1: "liver", 2: "right kidney", 3: "spleen", 4: "pancreas", 5: "aorta",
        6: "inferior vena cava", 7: "right adrenal gland", 8: "left adrenal gland", 9: "gallbladder",
        10: "esophagus", 11: "stomach", 12: "duodenum", 13: "left kidney", 14: "tumor",
    }  # fmt: skip
    assert C.NUM_CLASSES == 15  # "Organ and tumor models output 15 channels"
    assert C.BACKGROUND == 0 and C.TUMOR_ID == 14
    assert C.ORGAN_IDS == (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)
    assert C.FOREGROUND_IDS == C.ORGAN_IDS + (14,)
    assert C.LABEL_KEYS[6] == "inferior_vena_cava" and C.NAME_TO_ID["left_kidney"] == 13
    assert C.CHANNEL_DEF == {str(i): n for i, n in C.LABELS.items()}
    # section 2: "some only 5 organs + tumor" (METHOD.md does not name them: liver, both kidneys, spleen, pancreas)
    assert C.PARTIAL_FIVE_ORGANS == (1, 2, 3, 4, 13)


# --- METHOD.md section 2: CT normalisation fingerprint -----------------------------------------------------------------
def test_fingerprint_defaults_section_2():
    # "organ model clip [-965, 276], mean 79.65, std 139.34; tumor model clip [-967, 291], mean 83.56, std 136.62"
    assert C.FINGERPRINT_DEFAULTS == {
        "organ": {"clip_low": -965.0, "clip_high": 276.0, "mean": 79.65, "std": 139.34},
        "tumor": {"clip_low": -967.0, "clip_high": 291.0, "mean": 83.56, "std": 136.62},
    }


# --- METHOD.md section 3: ROI extractor --------------------------------------------------------------------------------
def test_roi_extractor_section_3():
    assert C.ROI_INPLANE_STRIDE == 4  # "every 4th voxel in-plane"
    assert C.ROI_SLICE_TARGET_MM == 5.0  # "k = max(1, round(5 mm / slice spacing))"
    assert C.ROI_CLIP == (-1024.0, 1024.0)  # "Clip to [-1024, 1024]"
    assert C.ROI_MAX_WHOLE_SLICES == 240  # "at most 240 slices, one forward pass"
    assert C.ROI_PAD_MULTIPLE == 16  # "zero-padded to a multiple of 16"
    assert C.ROI_PATCH_ZYX == (80, 128, 128) and C.ROI_PATCH_XYZ == xyz((80, 128, 128))  # patch / tiles 80 x 128 x 128
    assert C.ROI_ENCODER_DEPTHS == (2, 2, 4, 6, 4)  # "encoder depths 2, 2, 4, 6, 4"
    assert C.ROI_STRIDES == (1, 2, 2, 2, 2)  # "strides 1, 2, 2, 2, 2"
    assert C.ROI_NUM_CLASSES == 2  # "Output: 2 channels"
    # "40 mm towards the feet, 20 mm towards the head, 5 mm on each in-plane side"
    assert (C.ROI_MARGIN_FEET_MM, C.ROI_MARGIN_HEAD_MM, C.ROI_MARGIN_INPLANE_MM) == (40.0, 20.0, 5.0)
    # Not in METHOD.md (its ROI inference is one plain pass): the ROI bundle's extra pass mirrored along y,
    # chosen on validation phantoms (constants.py comment, roi_extractor README); the pipeline skips it.
    assert C.ROI_MIRROR_AXES == (1,)


def test_training_context_margins():
    # Not in METHOD.md (section 2 crops the fine models' training scans to the labels' box): the training context
    # draws a margin per side in [low, high] mm (constants.py comment). Its widest must cover the section 3 ROI margins.
    assert C.CONTEXT_MARGINS_MM == {"feet": (0.0, 120.0), "head": (0.0, 60.0), "inplane": (0.0, 30.0)}
    assert C.CONTEXT_MARGINS_MM["feet"][1] >= C.ROI_MARGIN_FEET_MM
    assert C.CONTEXT_MARGINS_MM["head"][1] >= C.ROI_MARGIN_HEAD_MM
    assert C.CONTEXT_MARGINS_MM["inplane"][1] >= C.ROI_MARGIN_INPLANE_MM


# --- METHOD.md section 4: organ and tumor models (the table) -----------------------------------------------------------
def test_fine_models_section_4():
    # "target spacing (z, y, x) mm | 2.5, 0.82, 0.82 | 4.0, 1.2, 1.2"
    assert C.ORGAN_SPACING_ZYX == (2.5, 0.82, 0.82) and C.ORGAN_SPACING_XYZ == xyz((2.5, 0.82, 0.82))
    assert C.TUMOR_SPACING_ZYX == (4.0, 1.2, 1.2) and C.TUMOR_SPACING_XYZ == xyz((4.0, 1.2, 1.2))
    # "patch (z, y, x) | 64 x 128 x 224 (paper's training table says 32 x 128 x 192) | 32 x 128 x 192"
    assert C.ORGAN_PATCH_ZYX == (64, 128, 224) and C.ORGAN_PATCH_XYZ == xyz((64, 128, 224))
    assert C.TUMOR_PATCH_ZYX == (32, 128, 192) and C.TUMOR_PATCH_XYZ == xyz((32, 128, 192))
    # "features 32, 64, 128, 256, 320, 320" (6 resolution stages)
    assert C.FILTERS == (32, 64, 128, 256, 320, 320)
    # "kernels | [1,3,3], then [3,3,3] x 5" for both models
    assert C.KERNELS_XYZ == tuple(xyz(k) for k in [[1, 3, 3]] + [[3, 3, 3]] * 5)
    # "pools | [1,1,1],[1,2,2],[2,2,2],[2,2,2],[2,2,2],[2,2,2] | [1,1,1],[1,2,2],[2,2,2],[2,2,2],[2,2,2],[1,2,2]"
    assert C.ORGAN_STRIDES_XYZ == tuple(xyz(s) for s in [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]])
    assert C.TUMOR_STRIDES_XYZ == tuple(xyz(s) for s in [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]])
    # "sliding-window overlap | 0.2 (step 0.8) | 0.5"
    assert C.ORGAN_OVERLAP == 0.2 and C.TUMOR_OVERLAP == 0.5


# --- METHOD.md sections 3 and 4: optimisation --------------------------------------------------------------------------
def test_optimisation_sections_3_and_4():
    assert C.LEARNING_RATE == 0.01  # "lr 0.01"
    assert C.MOMENTUM == 0.95  # "SGD nesterov, momentum 0.95" (section 4; section 3: the paper's table, the code uses 0.99)
    assert C.POLY_POWER == 0.9  # section 3 **Decision**: 0.9 (nnU-Net), the paper prints ^2
    assert C.BATCH_SIZE == 2  # "batch 2"
    assert C.EPOCH_LENGTH == 250  # "250 iterations per epoch"
    assert C.FINETUNE_LEARNING_RATE == 1e-4  # "Fine-tuning: lr 1e-4, batch 4"
    assert C.FINETUNE_BATCH_SIZE == 4


# --- METHOD.md section 5, step 6: post-processing ----------------------------------------------------------------------
def test_postprocessing_section_5():
    assert C.POSTPROCESS_CONNECTIVITY == 26  # "(26-connectivity)"
    assert C.KEEP_LARGEST_IDS == (1, 3, 4, 7, 8, 11)  # liver, spleen, pancreas, right and left adrenal, stomach
    assert C.REMOVE_SMALL_IDS == (2, 9, 13)  # right kidney, gallbladder, left kidney
    assert C.SMALL_COMPONENT_FRACTION == 0.1  # "smaller than 10 % of the largest"
    untouched = {14, 5, 6, 10, 12}  # "tumor and the tubular organs (aorta, IVC, esophagus, duodenum) untouched"
    assert not untouched & (set(C.KEEP_LARGEST_IDS) | set(C.REMOVE_SMALL_IDS))


# --- METHOD.md section 6: evaluation -----------------------------------------------------------------------------------
def test_evaluation_section_6():
    # "tau_c in mm: liver 5, right kidney 3, spleen 3, pancreas 5, aorta 2, IVC 2, right adrenal 2,
    #  left adrenal 2, gallbladder 2, esophagus 3, stomach 5, duodenum 7, left kidney 3, tumor 2"
    tau = {
        "liver": 5, "right_kidney": 3, "spleen": 3, "pancreas": 5, "aorta": 2, "inferior_vena_cava": 2,
        "right_adrenal_gland": 2, "left_adrenal_gland": 2, "gallbladder": 2, "esophagus": 3, "stomach": 5,
        "duodenum": 7, "left_kidney": 3, "tumor": 2,
    }  # fmt: skip
    assert C.NSD_TOLERANCE_MM == {C.NAME_TO_ID[name]: float(mm) for name, mm in tau.items()}
    assert C.SLAB_RESTRICTED_IDS == (5, 6, 10)  # "Aorta, IVC, esophagus: ... restricted to the z-range of G"
    assert C.NSD_DSC_CUTOFF == 0.1  # "If DSC < cut-off, NSD = 0 ... A parameter, default 0.1"


# --- METHOD.md numbers defined outside constants.py, pinned where they are defined ------------------------------------
def test_loss_and_class_weights_section_4():
    from flare23.models.losses import WeightedDiceFocalLoss, class_weights

    # "lambda = 1, gamma = 2, alpha = 1, Dice smooth 1e-5, background excluded from Dice"
    defaults = {k: p.default for k, p in inspect.signature(WeightedDiceFocalLoss).parameters.items()}
    assert (defaults["lambda_focal"], defaults["gamma"], defaults["alpha"], defaults["smooth"]) == (1.0, 2.0, 1.0, 1e-5)
    assert defaults["include_background"] is False
    for bundle in ("organ_seg", "tumor_seg"):
        cfg = raw_config(bundle, "train.json")
        assert (cfg["lambda_focal"], cfg["focal_gamma"], cfg["focal_alpha"]) == (1.0, 2.0, 1.0), bundle
        assert cfg["loss"]["loss"]["smooth"] == 1e-5 and cfg["loss"]["loss"]["include_background"] is False, bundle
    # "loss class weights | 1 for all, raised for small organs | 1 for all, tumor 2"
    assert raw_config("tumor_seg", "train.json")["upweighted_classes"] == {"14": 2.0}
    # METHOD.md gives no number for the small organs: adrenals, gallbladder, esophagus at 2
    assert raw_config("organ_seg", "train.json")["upweighted_classes"] == {"7": 2.0, "8": 2.0, "9": 2.0, "10": 2.0}
    assert class_weights({"14": 2.0}) == [1.0] * 14 + [2.0]


def test_schedule_and_network_choice_in_the_configs_sections_3_and_4():
    for bundle in ("roi_extractor", "organ_seg", "tumor_seg"):
        cfg = raw_config(bundle, "train.json")
        assert cfg["max_epochs"] == 2000, bundle  # "2000 epochs"
        assert cfg["optimizer"]["nesterov"] is True, bundle  # "SGD nesterov"
    for bundle in ("organ_seg", "tumor_seg"):
        assert raw_config(bundle, "finetune.json")["max_epochs"] == 1000, bundle  # "Fine-tuning: ... 1000 epochs"
        # section 4 **Decision**: MONAI DynUNet with res_block=True as the default network
        assert raw_config(bundle, "train.json")["network_def"]["res_block"] is True, bundle


def test_fingerprint_percentiles_section_2():
    from flare23.data.fingerprint import FINGERPRINT_PERCENTILES

    assert FINGERPRINT_PERCENTILES == (0.5, 99.5)  # "the 0.5 and 99.5 percentiles, mean and std"


def test_inference_numbers_section_5():
    from flare23.data.resample import DEFAULT_BLOCK
    from flare23.inference.sliding import sliding_window_slabs

    # "Gaussian importance weighting (sigma = patch/8)"
    assert inspect.signature(sliding_window_slabs).parameters["sigma_scale"].default == 1 / 8
    # "in blocks of slices (default 150)"
    assert DEFAULT_BLOCK == 150
    assert raw_config("pipeline", "inference.json")["block_size"] == 150


def test_efficiency_sampling_section_6():
    from flare23.efficiency import EfficiencyMonitor

    # "GPU memory sampled every 0.1 s"
    assert inspect.signature(EfficiencyMonitor).parameters["interval"].default == 0.1
