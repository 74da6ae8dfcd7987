"""Blocked trilinear resampling with arg-max: seam-free (blocked == unblocked) and equal to torch's trilinear."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flare23.data.resample import linear_source_weights, resample_image, resample_labels

torch.set_num_threads(1)


def _probs(shape, seed=0, dtype=torch.float32, smooth=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if smooth:  # spatially correlated scores, like a network's, so that labels form regions
        x = F.avg_pool3d(x[None], 3, stride=1, padding=1, count_include_pad=False)[0]
    return torch.softmax(x * 4, dim=0).to(dtype)


def _torch_reference(probs, out_shape):
    """Whole-volume trilinear interpolation by torch (float32) and the top-2 gap per voxel."""
    up = F.interpolate(probs[None].float(), size=tuple(out_shape), mode="trilinear", align_corners=False)[0]
    top2 = up.topk(2, dim=0).values
    return up.argmax(0), top2[0] - top2[1]


def _assert_equal_up_to_ties(labels, probs, out_shape, tol=1e-5):
    ref, gap = _torch_reference(probs, out_shape)
    differ = labels.long() != ref
    # Every disagreement must be a (numerical) tie between the two best classes.
    assert torch.all(gap[differ] < tol), f"{int(differ.sum())} voxels differ, max gap {float(gap[differ].max())}"
    assert differ.float().mean() < 1e-3
    return int(differ.sum())


@pytest.mark.parametrize("in_size,out_size", [(7, 20), (20, 7), (5, 5), (1, 4), (4, 1), (13, 14)])
def test_source_weights_reproduce_torch_linear(in_size, out_size):
    x = torch.randn(in_size, dtype=torch.float32)
    i0, i1, w1 = linear_source_weights(in_size, out_size)
    mine = (1 - w1) * x[i0] + w1 * x[i1]
    ref = F.interpolate(x[None, None], size=out_size, mode="linear", align_corners=False)[0, 0]
    torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)
    # the documented formula, in float64 from scratch
    src = np.maximum((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0)
    np.testing.assert_array_equal(i0.numpy(), np.floor(src).astype(int))
    np.testing.assert_array_equal(i1.numpy(), np.minimum(np.floor(src).astype(int) + 1, in_size - 1))
    np.testing.assert_allclose(w1.numpy(), src - np.floor(src), atol=1e-5)


@pytest.mark.parametrize(
    "in_shape,out_shape,axis",
    [
        ((15, 14, 12, 9), (40, 33, 47), -1),  # upsampled along the blocked axis (in-plane pass first)
        ((6, 11, 10, 40), (19, 23, 31), 2),  # downsampled along the blocked axis (axial pass first)
        ((6, 30, 8, 9), (64, 8, 9), 0),  # same in-plane size, first axis blocked
        ((4, 9, 25, 7), (12, 37, 5), 1),
    ],
)
def test_blocked_equals_unblocked_and_torch(in_shape, out_shape, axis):
    probs = _probs(in_shape, seed=sum(in_shape))
    whole = resample_labels(probs, out_shape, block=10**6, axis=axis)
    assert whole.dtype == torch.uint8 and tuple(whole.shape) == out_shape
    length = out_shape[axis]
    for block in (1, 3, 7, length // 2 + 1, length - 1, length):  # several do not divide the length
        blocked = resample_labels(probs, out_shape, block=block, axis=axis)
        assert torch.equal(blocked, whole), f"block {block} leaves seams"
    _assert_equal_up_to_ties(whole, probs, out_shape)
    assert len(torch.unique(whole)) > 2  # a real multi-label map, not a constant


def test_default_block_many_blocks_and_out_device():
    probs = _probs((3, 10, 9, 64), seed=3)
    out_shape = (21, 17, 470)  # 150-slice blocks: four blocks, the last one partial
    labels = resample_labels(probs, out_shape, out_device="cpu")
    assert torch.equal(labels, resample_labels(probs, out_shape, block=out_shape[2]))
    _assert_equal_up_to_ties(labels, probs, out_shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    probs = _probs((5, 8, 9, 10), seed=7, dtype=dtype)
    out_shape = (17, 20, 23)
    labels = resample_labels(probs, out_shape, block=4)
    assert torch.equal(labels, resample_labels(probs, out_shape, block=23))
    _assert_equal_up_to_ties(labels, probs, out_shape)  # reference: the same half values in float32
    assert probs.dtype == dtype


def test_logits_and_input_untouched():
    logits = torch.randn(4, 6, 7, 8, generator=torch.Generator().manual_seed(1)) * 5
    before = logits.clone()
    labels = resample_labels(logits, (11, 13, 15), block=2, axis=0)
    assert torch.equal(logits, before)
    _assert_equal_up_to_ties(labels, logits, (11, 13, 15))
    one = resample_labels(logits[:1], (3, 4, 5))
    assert torch.equal(one, torch.zeros(3, 4, 5, dtype=torch.uint8))


def test_image_and_labels_share_the_convention():
    """argmax(x, c - x) == (x > c / 2): labels of a two-channel map equal the thresholded image."""
    x = torch.rand(9, 10, 7, generator=torch.Generator().manual_seed(5))
    out_shape = (20, 13, 31)
    img = resample_image(x, out_shape)
    torch.testing.assert_close(img, F.interpolate(x[None, None], size=out_shape, mode="trilinear", align_corners=False)[0, 0])
    labels = resample_labels(torch.stack([x, 1 - x]), out_shape, block=4)
    expected = (img < 0.5).to(torch.uint8)  # channel 1 wins where 1 - x > x
    differ = labels != expected
    assert torch.all((img[differ] - 0.5).abs() < 1e-5)
    assert differ.sum() <= 2


def test_resample_image_modes_and_dtype():
    x = torch.arange(4 * 5 * 6, dtype=torch.int16).reshape(4, 5, 6)
    near = resample_image(x, (8, 10, 12), mode="nearest")
    assert near.dtype == torch.float32
    torch.testing.assert_close(near, x.float().repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2))
    same = resample_image(x.float(), (4, 5, 6))
    torch.testing.assert_close(same, x.float())
    with pytest.raises(ValueError, match="mode"):
        resample_image(x, (8, 10, 12), mode="cubic")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"probs": torch.rand(2, 3, 4), "out_shape": (3, 4, 5)}, "C, D0, D1, D2"),
        ({"probs": torch.ones(2, 3, 4, 5, dtype=torch.long), "out_shape": (3, 4, 5)}, "floating"),
        ({"probs": torch.rand(2, 3, 4, 5), "out_shape": (3, 4)}, "out_shape"),
        ({"probs": torch.rand(2, 3, 4, 5), "out_shape": (3, 4, 5), "block": 0}, "block"),
        ({"probs": torch.rand(2, 3, 4, 5), "out_shape": (3, 4, 5), "axis": 3}, "axis"),
        ({"probs": torch.rand(257, 1, 1, 1), "out_shape": (1, 1, 1)}, "uint8"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resample_labels(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_bounds_memory():
    probs = _probs((15, 20, 40, 40), seed=11).half()
    out_shape = (600, 96, 96)  # blocked along axis 0
    cpu = resample_labels(probs, out_shape, block=25, axis=0)
    dev = probs.cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    gpu = resample_labels(dev, out_shape, block=25, axis=0, out_device="cpu")
    peak = torch.cuda.max_memory_allocated() - base
    assert gpu.device.type == "cpu"
    assert (gpu != cpu).float().mean() < 1e-4  # different kernels: only numerical ties may differ
    # extra device memory: a few float32 copies of one block, far below the full float32 volume
    assert peak < 0.25 * 15 * 600 * 96 * 96 * 4


# --- the uniform-cell shortcut ------------------------------------------------------------------
def test_cell_labels_equal_a_brute_force_over_the_corners():
    from flare23.data.resample import MIXED, cell_labels

    probs = _probs((4, 6, 5, 7), seed=3)
    low = probs.argmax(0).numpy()
    got = cell_labels(probs).numpy()
    n = low.shape
    for a in range(n[0]):
        for b in range(n[1]):
            for c in range(n[2]):
                corners = {int(low[i, j, k]) for i in {a, min(a + 1, n[0] - 1)} for j in {b, min(b + 1, n[1] - 1)}
                           for k in {c, min(c + 1, n[2] - 1)}}  # fmt: skip
                assert got[a, b, c] == (corners.pop() if len(corners) == 1 else MIXED)


def test_a_class_that_wins_at_no_corner_can_win_between_them():
    # Corners alternate between classes 0 and 1 with class 2 close behind everywhere: the mixture of
    # the corners is won by class 2, which the low-resolution arg-max never shows (a mixed cell).
    probs = torch.zeros(3, 2, 2, 2)
    probs[:, 0] = torch.tensor([0.5, 0.1, 0.4]).view(3, 1, 1)
    probs[:, 1] = torch.tensor([0.1, 0.5, 0.4]).view(3, 1, 1)
    labels = resample_labels(probs, (3, 2, 2), block=1)  # the middle slice lies half-way
    assert set(labels.unique().tolist()) == {0, 1, 2}
    _assert_equal_up_to_ties(labels, probs, (3, 2, 2))


def test_exact_ties_go_to_the_lower_class_in_uniform_and_mixed_cells():
    probs = torch.full((4, 3, 3, 3), 0.25)  # every class tied everywhere: uniform cells of class 0
    assert int(resample_labels(probs, (7, 5, 6)).max()) == 0
    probs[1, 0] = 0.25 + 1e-3  # class 1 wins in the first slice only: mixed cells next to it
    labels = resample_labels(probs, (7, 5, 6), axis=0, block=2)
    ref, _ = _torch_reference(probs, (7, 5, 6))
    assert torch.equal(labels.long(), ref)


def test_organ_like_probabilities_match_torch_and_most_cells_are_uniform():
    from flare23.data.resample import MIXED, cell_labels

    # Blobs of 15 classes at a model grid, softened like a network's output, upsampled about 1.2 x 1.2 x 3.
    g = torch.Generator().manual_seed(5)
    seeds = torch.randint(0, 15, (6, 5, 4), generator=g)
    low = F.interpolate(seeds[None, None].float(), size=(36, 30, 16), mode="nearest")[0, 0].long()
    onehot = F.one_hot(low, 15).permute(3, 0, 1, 2).float()
    probs = torch.softmax(
        F.avg_pool3d(onehot[None], 3, stride=1, padding=1)[0] * 8 + 0.2 * torch.randn(onehot.shape, generator=g), 0
    )
    assert float((cell_labels(probs) == MIXED).float().mean()) < 0.5
    out_shape = (43, 36, 48)
    labels = resample_labels(probs, out_shape, block=7)
    _assert_equal_up_to_ties(labels, probs, out_shape)
    assert torch.equal(labels, resample_labels(probs, out_shape, block=1000))


def test_noisy_and_clean_slices_in_one_volume_match_torch_whatever_the_block():
    import flare23.data.resample as rs

    # the first half of the slices is noise (mostly mixed cells: whole-slice path), the second half
    # one class (uniform cells), the border in between mixed voxel by voxel
    g = torch.Generator().manual_seed(11)
    probs = torch.softmax(torch.randn(6, 10, 9, 16, generator=g), 0)
    probs[:, :, :, 8:] = torch.softmax(torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0, 0.0]), 0).view(6, 1, 1, 1)
    cells = rs.cell_labels(probs)
    assert float((cells[..., :6] == rs.MIXED).float().mean()) > rs._DENSE_FRACTION and bool((cells[..., 9:] == 2).all())
    out_shape = (23, 19, 41)
    labels = resample_labels(probs, out_shape, block=5)
    _assert_equal_up_to_ties(labels, probs, out_shape)
    for block in (1, 7, 1000):
        assert torch.equal(labels, resample_labels(probs, out_shape, block=block))


def test_results_do_not_depend_on_the_mixed_voxel_chunk(monkeypatch):
    import flare23.data.resample as rs

    # noisy slices (whole-slice path), clean ones and a border, with the mixed voxels taken one
    # output slice at a time along every axis: identical labels to the default chunking
    g = torch.Generator().manual_seed(12)
    probs = torch.softmax(torch.randn(5, 9, 11, 14, generator=g), 0)
    probs[:, :, 5:, :] = torch.softmax(torch.tensor([0.0, 2.0, 0.0, 0.0, 0.0]), 0).view(5, 1, 1, 1)
    out_shape = (17, 23, 19)
    for axis in (0, 1, 2):
        ref = resample_labels(probs, out_shape, block=6, axis=axis)
        with monkeypatch.context() as m:
            m.setattr(rs, "_MIXED_CHUNK", 1)
            assert torch.equal(resample_labels(probs, out_shape, block=6, axis=axis), ref)
    _assert_equal_up_to_ties(ref, probs, out_shape)


def test_argmax_labels_match_torch_in_any_chunk_with_ties_to_the_lower_class():
    from flare23.data.resample import argmax_labels

    g = torch.Generator().manual_seed(4)
    probs = torch.randint(0, 3, (6, 7, 5, 4), generator=g).half()  # many exact ties
    ref = probs.float().argmax(0)
    ties = (probs == probs.max(0).values).sum(0) > 1
    assert bool(ties.any())
    first = torch.stack([(probs[: c + 1] == probs.max(0).values).any(0) for c in range(6)]).float().argmax(0)
    assert torch.equal(ref, first)  # torch's arg-max takes the first maximum
    for chunk in (1, 20, 1 << 20):
        got = argmax_labels(probs, chunk=chunk)
        assert got.dtype == torch.uint8 and torch.equal(got.long(), ref)


def test_whole_slice_groups_do_not_change_the_labels(monkeypatch):
    import flare23.data.resample as rs

    # noisy probabilities (every slice takes the whole-slice path), interpolated one slice per group
    g = torch.Generator().manual_seed(13)
    probs = torch.softmax(torch.randn(7, 8, 9, 10, generator=g), 0)
    out_shape = (15, 11, 21)
    ref = resample_labels(probs, out_shape, block=9)
    with monkeypatch.context() as m:
        m.setattr(rs, "_DENSE_VALUES", 1)
        assert torch.equal(resample_labels(probs, out_shape, block=9), ref)
    _assert_equal_up_to_ties(ref, probs, out_shape)
