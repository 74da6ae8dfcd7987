"""Ensemble (paper eq. 5) and connected-component post-processing, on hand-built and random label maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import KeepLargestConnectedComponent
from scipy import ndimage

from flare23.constants import KEEP_LARGEST_IDS, NUM_CLASSES, REMOVE_SMALL_IDS, SMALL_COMPONENT_FRACTION, TUMOR_ID
from flare23.inference.postprocess import ensemble, postprocess

FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity for scipy


# --- ensemble ----------------------------------------------------------------------------------
def _all_pairs():
    organ, tumor = np.meshgrid(np.arange(NUM_CLASSES), np.arange(NUM_CLASSES), indexing="ij")
    return organ.astype(np.uint8).reshape(15, 15, 1), tumor.astype(np.uint8).reshape(15, 15, 1)


def _eq5(o: int, t: int) -> int:
    """METHOD.md section 5 step 5, written out voxel by voxel."""
    if t == TUMOR_ID:
        return TUMOR_ID  # the final tumor is exactly the tumor model's tumor
    if o == TUMOR_ID:
        return t  # organ model said tumor, tumor model did not: the tumor model's label
    return o  # elsewhere the organ model's label


def test_ensemble_every_label_pair_numpy():
    organ, tumor = _all_pairs()
    o0, t0 = organ.copy(), tumor.copy()
    result = ensemble(organ, tumor)
    expected = np.vectorize(_eq5)(organ, tumor)
    np.testing.assert_array_equal(result, expected)
    assert result.dtype == organ.dtype
    np.testing.assert_array_equal(organ, o0)
    np.testing.assert_array_equal(tumor, t0)
    # the tumor of the result is exactly the tumor model's tumor
    np.testing.assert_array_equal(result == TUMOR_ID, tumor == TUMOR_ID)


def test_ensemble_torch_and_custom_tumor_id():
    organ, tumor = _all_pairs()
    ot, tt = torch.from_numpy(organ.copy()), torch.from_numpy(tumor.copy())
    result = ensemble(ot, tt, tumor_id=3)
    assert isinstance(result, torch.Tensor) and result.dtype == torch.uint8
    expected = np.where((tumor == 3) | (organ == 3), tumor, organ)
    np.testing.assert_array_equal(result.numpy(), expected)
    assert torch.equal(ot, torch.from_numpy(organ)) and torch.equal(tt, torch.from_numpy(tumor))
    with pytest.raises(ValueError, match="shape"):
        ensemble(organ, tumor[:-1])


# --- post-processing on hand-built maps ---------------------------------------------------------
def _hand_built():
    lab = np.zeros((24, 24, 24), dtype=np.uint8)
    lab[2:8, 2:8, 2:8] = 1  # liver, 216 voxels
    lab[8, 8, 8] = 1  # touches the big block only through a corner: same 26-component, kept
    lab[15:17, 15:17, 15:17] = 1  # second liver component (8 voxels): removed
    lab[2:4, 20:22, 2:4] = 3  # spleen: two equal components (8 each): the first in C order is kept
    lab[10:12, 20:22, 2:4] = 3
    lab[12:22, 2:12, 20:21] = 2  # right kidney, 100 voxels
    lab[20:22, 20:22, 20:23] = 2  # 12 voxels (>= 10 %): kept
    lab[0:10, 23, 23] = 2  # exactly 10 voxels = 10 % of 100: kept
    lab[18, 0:9, 0] = 2  # 9 voxels < 10 %: removed
    lab[0:3, 12, 0:3] = 14  # tumor, two components: untouched
    lab[22, 22, 0] = 14
    lab[10:12, 0, 10] = 5  # aorta, two components: untouched
    lab[14, 0, 10] = 5
    return lab


def test_postprocess_hand_built_rules():
    lab = _hand_built()
    before = lab.copy()
    out = postprocess(lab)
    np.testing.assert_array_equal(lab, before)  # input untouched
    expected = before.copy()
    expected[15:17, 15:17, 15:17] = 0  # small liver component
    expected[10:12, 20:22, 2:4] = 0  # the later of two equal spleen components
    expected[18, 0:9, 0] = 0  # kidney fragment below 10 %
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == lab.dtype
    # the corner-touching liver voxel survives with 26-connectivity but not with 6-connectivity
    assert out[8, 8, 8] == 1
    assert postprocess(lab, connectivity=6)[8, 8, 8] == 0


def test_postprocess_fraction_and_lists_are_parameters():
    lab = _hand_built()
    out = postprocess(lab, keep_largest=(), remove_small=(2,), fraction=0.11)
    assert (out[0:10, 23, 23] == 0).all() and (out[20:22, 20:22, 20:23] == 2).all()  # 10 < 11 <= 12
    assert (out[15:17, 15:17, 15:17] == 1).all()  # liver not in any list: untouched
    np.testing.assert_array_equal(postprocess(lab, keep_largest=(), remove_small=()), lab)


def test_postprocess_torch_in_torch_out():
    lab = _hand_built()
    t = torch.from_numpy(lab.copy())
    out = postprocess(t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), postprocess(lab))
    assert torch.equal(t, torch.from_numpy(lab))


# --- against independent implementations on random maps ----------------------------------------
def _random_map(seed: int, shape=(28, 26, 24)):
    rng = np.random.default_rng(seed)
    noise = ndimage.uniform_filter(rng.random((NUM_CLASSES, *shape)), size=3)
    lab = noise.argmax(0).astype(np.uint8)  # blobby regions with many fragments
    lab[rng.random(shape) < 0.3] = 0
    return lab


def _unique_largest(lab, value):
    comps, n = ndimage.label(lab == value, structure=FULL)
    sizes = np.bincount(comps.ravel())[1:]
    return n > 1 and (sizes == sizes.max()).sum() == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keep_largest_equals_monai(seed):
    lab = _random_map(seed)
    values = [v for v in KEEP_LARGEST_IDS if _unique_largest(lab, v)]
    assert len(values) >= 3  # the maps do exercise the rule
    out = postprocess(lab, keep_largest=values, remove_small=())
    reference = torch.from_numpy(lab.copy())[None]
    for v in values:  # MONAI's transform, one label at a time, is the reference (on a copy: it edits in place)
        reference = KeepLargestConnectedComponent(applied_labels=[v], connectivity=3)(reference.clone())
    np.testing.assert_array_equal(out, np.asarray(reference[0]))
    assert (out != lab).sum() > 0


@pytest.mark.parametrize("seed", [3, 4])
def test_remove_small_equals_scipy(seed):
    lab = _random_map(seed)
    out = postprocess(lab, keep_largest=(), remove_small=REMOVE_SMALL_IDS)
    expected = lab.copy()
    for v in REMOVE_SMALL_IDS:
        comps, n = ndimage.label(lab == v, structure=FULL)
        sizes = ndimage.sum_labels(np.ones_like(comps), comps, index=np.arange(1, n + 1))
        small = np.flatnonzero(sizes < SMALL_COMPONENT_FRACTION * sizes.max()) + 1
        expected[np.isin(comps, small)] = 0
    np.testing.assert_array_equal(out, expected)
    assert (out != lab).sum() > 0


def test_default_lists_leave_other_labels_alone():
    lab = _random_map(5)
    out = postprocess(lab)
    listed = np.isin(lab, KEEP_LARGEST_IDS + REMOVE_SMALL_IDS)
    np.testing.assert_array_equal(out[~listed], lab[~listed])
    assert set(np.unique(out[listed])) <= set(KEEP_LARGEST_IDS + REMOVE_SMALL_IDS) | {0}
    for v in KEEP_LARGEST_IDS:
        assert ndimage.label(out == v, structure=FULL)[1] <= 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="integers"):
        postprocess(np.zeros((4, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="connectivity"):
        postprocess(np.zeros((4, 4, 4), dtype=np.uint8), connectivity=8)
    with pytest.raises(ValueError, match="both"):
        postprocess(np.zeros((4, 4, 4), dtype=np.uint8), keep_largest=(1,), remove_small=(1,))
    with pytest.raises(ValueError, match="2D or 3D"):
        postprocess(np.zeros((2, 4, 4, 4), dtype=np.uint8))
