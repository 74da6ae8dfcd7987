"""Streaming sliding window (equal to MONAI's) and streaming label resampling (equal to the whole-volume one)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from flare23.data.resample import StreamingLabels, resample_labels
from flare23.inference.sliding import sliding_window_slabs

torch.set_num_threads(1)


def _net(channels_out=3, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d(1, channels_out, 3, padding=1)
    return lambda x: torch.softmax(conv(x), 1)


@pytest.mark.parametrize(
    "shape, roi, overlap, axis, batch",
    [
        ((20, 17, 30), (8, 8, 8), 0.5, 2, 1),
        ((20, 17, 30), (8, 6, 10), 0.2, 0, 3),
        ((5, 17, 9), (8, 8, 4), 0.5, 2, 2),  # smaller than the window in one axis: padded
        ((12, 12, 12), (12, 12, 12), 0.5, 1, 1),  # exactly one window
        ((9, 11, 40), (6, 7, 9), 0.25, -1, 4),
    ],
)
def test_slabs_equal_monai_sliding_window(shape, roi, overlap, axis, batch):
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    net = _net()
    with torch.inference_mode():
        ref = sliding_window_inference(x, roi, batch, net, overlap=overlap, mode="gaussian", sigma_scale=0.125,
                                       padding_mode="constant", cval=-1.5)[0]  # fmt: skip
        slabs = list(sliding_window_slabs(x, net, roi, overlap, axis=axis, sw_batch_size=batch, cval=-1.5))
    ax = axis % 3
    assert [s[0] for s in slabs] == [0] + [s[1] for s in slabs[:-1]] and slabs[-1][1] == shape[ax]  # in order, once
    got = torch.cat([s[2] for s in slabs], dim=1 + ax)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_slabs_of_a_long_volume_are_bounded_by_the_window():
    x = torch.randn(1, 1, 10, 10, 200)
    sizes = [b - a for a, b, _ in sliding_window_slabs(x, _net(), (8, 8, 16), 0.5, axis=2)]
    assert sum(sizes) == 200 and len(sizes) >= 200 // 16 and max(sizes) <= 16


@pytest.mark.parametrize(
    "in_shape, out_shape, axis", [((9, 8, 13), (20, 15, 37), 2), ((9, 8, 13), (20, 15, 5), 2), ((12, 7, 6), (30, 9, 11), 0)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_labels_equal_whole_volume_labels(in_shape, out_shape, axis, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(F.avg_pool3d(torch.randn(5, *in_shape, generator=g)[None], 3, 1, 1)[0] * 5, 0)
    whole = resample_labels(probs, out_shape, axis=axis)
    n = in_shape[axis]
    cuts = sorted(set(torch.randint(1, n, (4,), generator=g).tolist()))
    stream = StreamingLabels(in_shape, out_shape, axis=axis, block=3)
    for a, b in zip([0, *cuts], [*cuts, n]):
        stream.add(probs.narrow(1 + axis, a, b - a))
    assert torch.equal(stream.result(), whole)


def test_streamed_labels_refuse_slabs_that_do_not_fit_and_early_results():
    stream = StreamingLabels((4, 4, 6), (8, 8, 12))
    with pytest.raises(ValueError, match="does not continue"):
        stream.add(torch.rand(3, 4, 5, 2))
    stream.add(torch.rand(3, 4, 4, 2))
    with pytest.raises(ValueError, match="2 of 6 source slices"):
        stream.result()
    with pytest.raises(ValueError, match="does not continue"):
        stream.add(torch.rand(3, 4, 4, 5))


def test_sliding_window_then_streamed_labels_equal_monai_then_resample():
    x = torch.randn(1, 1, 14, 12, 40, generator=torch.Generator().manual_seed(2))
    net = _net(channels_out=4, seed=3)
    with torch.inference_mode():
        probs = sliding_window_inference(x, (8, 8, 12), 1, net, overlap=0.5, mode="gaussian", sigma_scale=0.125)[0]
        stream = StreamingLabels(x.shape[2:], (30, 25, 90), axis=2, block=7)
        for _, _, slab in sliding_window_slabs(x, net, (8, 8, 12), 0.5, axis=2):
            stream.add(slab)
    ref = resample_labels(probs, (30, 25, 90))
    differ = stream.result() != ref
    assert differ.float().mean() < 1e-4  # only float32 rounding of the window sums can tip a near-tie


@pytest.mark.parametrize("in_len, out_len", [(13, 37), (13, 5), (13, 13), (2, 9), (9, 2)])
def test_streamed_labels_one_slice_at_a_time(in_len, out_len):
    g = torch.Generator().manual_seed(in_len * 100 + out_len)
    probs = torch.softmax(torch.randn(4, 6, 5, in_len, generator=g) * 3, 0)
    stream = StreamingLabels((6, 5, in_len), (11, 7, out_len), block=2)
    for k in range(in_len):
        stream.add(probs[..., k : k + 1])
        assert stream.pending is None or stream.pending.shape[-1] <= 2  # never more than the context slices
    assert torch.equal(stream.result(), resample_labels(probs, (11, 7, out_len)))
