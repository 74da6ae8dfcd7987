"""Gaussian sliding-window inference that hands out finished slabs, so memory does not grow with the scan.

MONAI's ``SlidingWindowInferer`` allocates the class probabilities of the whole volume (``C x``
the model grid; for the organ model on a 512 x 512 x 1000 scan at 0.8 mm, 15 x 446 x 446 x 320
float32 = 3.8 GB) before anything else can happen, and the pipeline then reads them back to labels.
:func:`sliding_window_slabs` places exactly the same windows (MONAI's ``dense_patch_slices`` with
MONAI's scan interval and padding) and weights them with the same Gaussian (MONAI's
``compute_importance_map``), but runs them in the order of their start along one axis (normally the
slice axis) and yields every run of slices as soon as no further window can touch it. Only about
two windows' depth of probabilities is held at any time, whatever the length of the scan; the
consumer (:class:`flare23.data.resample.StreamingLabels`) turns each slab into labels at once.

The result equals MONAI's ``sliding_window_inference`` with ``mode="gaussian"`` to float32
rounding (the sums over overlapping windows are taken in another order), which the tests check.

Windows may be skipped (:mod:`flare23.inference.skipping` decides which): ``run_window`` is asked about
every window (its slices on the unpadded input, :func:`window_slices`), and a window it refuses is not
given to the predictor but contributes ``skip_probs`` (e.g. one-hot background) times the Gaussian
weight, as if the network had answered that. Voxels covered only by skipped windows then get
``skip_probs``, and voxels covered by run windows too get the usual weighted mean in which the
skipped windows count as that answer. With every window run the result is bit-identical to the
function without ``run_window``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices

#: windows per forward pass by device: on a CPU one window at a time was as fast per window as two (organ
#: network, paper widths, bf16 autocast on an AVX-512-BF16 EPYC, 2 threads: 5.12 vs 5.64 s per window; OpenVINO
#: bf16 3.13 vs 3.19 s) and holds half the activations (peak RSS 2.3 vs 3.8 GB); on CUDA two windows keep the
#: device busier (MONAI's bundles use 4).
SW_BATCH_SIZE = {"cpu": 1, "cuda": 2}


def default_sw_batch_size(device) -> int:
    """Windows per forward pass on ``device`` (a ``torch.device`` or its name): :data:`SW_BATCH_SIZE`, 1 elsewhere."""
    return SW_BATCH_SIZE.get(torch.device(device).type, 1)


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> tuple[int, ...]:
    """MONAI's step between windows: ``int(roi * (1 - overlap))`` (at least 1), ``roi`` where roi == image."""
    return tuple(int(r) if r == n else max(1, int(r * (1 - overlap))) for n, r in zip(image_size, roi_size))


def window_padding(image_size: Sequence[int], roi: Sequence[int]) -> tuple[list[int], list[int]]:
    """MONAI's padding of an image smaller than the window: symmetric, the extra voxel after."""
    before = [max(r - n, 0) // 2 for r, n in zip(roi, image_size)]
    after = [max(r - n, 0) - b for r, n, b in zip(roi, image_size, before)]
    return before, after


def window_slices(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> list[tuple[slice, slice, slice]]:
    """The windows that :func:`sliding_window_slabs` places on an image of ``image_size``, in MONAI's order.

    Each is given on the *unpadded* image: a window that reaches into MONAI's padding (the image is
    smaller than the window along an axis) is clipped to the image. These are the slices that a
    ``run_window`` predicate receives.
    """
    roi = tuple(int(r) for r in roi_size)
    original = tuple(int(s) for s in image_size)
    before, after = window_padding(original, roi)
    size = tuple(n + b + a for n, b, a in zip(original, before, after))
    windows = dense_patch_slices(size, roi, scan_interval(size, roi, overlap))
    return [_unpadded(w, before, original) for w in windows]


def _unpadded(window, before, original) -> tuple[slice, slice, slice]:
    return tuple(slice(max(0, int(w.start) - b), min(n, int(w.stop) - b)) for w, b, n in zip(window, before, original))


def _local(window, axis: int, start: int) -> tuple[slice, ...]:
    """``window`` in the coordinates of a buffer that starts at ``start`` along ``axis``."""
    out = list(window)
    out[axis] = slice(int(window[axis].start) - start, int(window[axis].stop) - start)
    return tuple(out)


def _buffer(acc, carry, channels: int, shape, axis: int, dtype, device):
    """The group's sums ``(channels, *shape)``, made at its first window with what the previous group left; checked after."""
    if acc is None:
        acc = torch.zeros([channels, *shape], dtype=dtype, device=device)
        if carry is not None:
            acc.narrow(1 + axis, 0, carry.shape[1 + axis]).copy_(carry)
        return acc, None
    if acc.shape[0] != channels:
        raise ValueError(f"sliding_window_slabs: {channels} classes where the other windows had {acc.shape[0]}")
    return acc, carry


def sliding_window_slabs(
    inputs: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    roi_size: Sequence[int],
    overlap: float,
    axis: int = -1,
    sw_batch_size: int = 1,
    sigma_scale: float = 0.125,
    cval: float = 0.0,
    acc_dtype: torch.dtype = torch.float32,
    run_window: Callable[[tuple[slice, slice, slice]], bool] | None = None,
    skip_probs: Sequence[float] | torch.Tensor | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Gaussian-weighted sliding-window predictions of ``inputs``, slab by slab along ``axis``.

    Args:
        inputs: ``(1, channels, D0, D1, D2)`` image on the device the predictor runs on.
        predictor: maps a ``(n, channels, *roi_size)`` batch of windows to ``(n, C, *roi_size)``
            (e.g. softmax probabilities).
        roi_size: window size (three ints).
        overlap: fraction of a window shared with the next one, in ``[0, 1)``.
        axis: spatial axis (0, 1, 2 or negative) along which slabs are handed out.
        sw_batch_size: windows per predictor call (windows of one start along ``axis``).
        sigma_scale: Gaussian sigma as a fraction of the window (MONAI's default 0.125).
        cval: padding value where the image is smaller than a window.
        acc_dtype: dtype of the running sums (float32; float16 halves the buffer on CUDA).
        run_window: optional predicate, asked once per window with the window's slices on the
            unpadded input (:func:`window_slices`): ``False`` skips the window.
        skip_probs: what a skipped window contributes, per class (``C`` values, e.g. one-hot
            background), times the Gaussian weight; needed when a window is skipped.

    Yields:
        ``(start, stop, probs)`` with ``probs`` of shape ``(C, *spatial)`` for the slices
        ``start:stop`` along ``axis`` of the *unpadded* input, in order, covering it exactly once.
    """
    if inputs.ndim != 5 or inputs.shape[0] != 1:
        raise ValueError(f"sliding_window_slabs: inputs must be (1, channels, D0, D1, D2), got {tuple(inputs.shape)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"sliding_window_slabs: overlap must be in [0, 1), got {overlap}")
    axis = axis % 3
    roi = tuple(int(r) for r in roi_size)
    original = tuple(int(s) for s in inputs.shape[2:])
    # MONAI pads an image smaller than the window symmetrically (the extra voxel after) with cval.
    before, after = window_padding(original, roi)
    if any(before) or any(after):
        pad = [v for d in (2, 1, 0) for v in (before[d], after[d])]
        inputs = F.pad(inputs, pad, mode="constant", value=cval)
    size = tuple(int(s) for s in inputs.shape[2:])
    windows = dense_patch_slices(size, roi, scan_interval(size, roi, overlap))
    weight = compute_importance_map(roi, mode="gaussian", sigma_scale=sigma_scale, device=inputs.device, dtype=acc_dtype)
    skip = None
    if skip_probs is not None:
        skip = torch.as_tensor(skip_probs, dtype=acc_dtype).flatten().to(inputs.device)
        # classes a skipped window adds to (one-hot background: one), with their values
        skip_terms = [(int(c), float(skip[c])) for c in torch.nonzero(skip).flatten().tolist()]
    starts = sorted({int(w[axis].start) for w in windows})
    groups = {s: [w for w in windows if int(w[axis].start) == s] for s in starts}
    keep = [slice(b, b + n) for b, n in zip(before, original)]  # the unpadded part of each axis

    acc = cnt = None
    base = 0  # index along axis of the first slice held in acc / cnt
    emitted = 0  # padded index up to which slabs have been handed out
    for g, s in enumerate(starts):
        # the buffer spans [s, s + roi) along axis; carry over what the previous windows left there
        shape = list(size)
        shape[axis] = roi[axis]
        # what the previous windows left in [s, ...) is kept; the old buffers go before new ones are made
        carry_acc = carry_cnt = None
        if acc is not None and base + acc.shape[1 + axis] > s:
            carry = base + acc.shape[1 + axis] - s
            carry_acc = acc.narrow(1 + axis, s - base, carry).clone()
            carry_cnt = cnt.narrow(1 + axis, s - base, carry).clone()
        acc = cnt = None
        new_acc, new_cnt = None, torch.zeros([1, *shape], dtype=acc_dtype, device=inputs.device)
        if carry_cnt is not None:
            new_cnt.narrow(1 + axis, 0, carry_cnt.shape[1 + axis]).copy_(carry_cnt)

        group = groups[s]
        if run_window is not None:
            ran, skipped = [], []
            for w in group:
                (ran if run_window(_unpadded(w, before, original)) else skipped).append(w)
            if skipped:
                if skip is None:
                    raise ValueError("sliding_window_slabs: a window was skipped but no skip_probs were given")
                new_acc, carry_acc = _buffer(new_acc, carry_acc, skip.numel(), shape, axis, acc_dtype, inputs.device)
            for w in skipped:  # as if the network had answered skip_probs: their classes x the weight
                lw = _local(w, axis, s)
                for c, v in skip_terms:
                    new_acc[(c, *lw)].add_(weight, alpha=v)
                new_cnt[(slice(None), *lw)].add_(weight)
            group = ran
        for i in range(0, len(group), sw_batch_size):
            batch = group[i : i + sw_batch_size]
            out = predictor(torch.cat([inputs[(slice(None), slice(None), *w)] for w in batch]))
            new_acc, carry_acc = _buffer(new_acc, carry_acc, int(out.shape[1]), shape, axis, acc_dtype, inputs.device)
            for w, o in zip(batch, out):
                lw = _local(w, axis, s)
                new_acc[(slice(None), *lw)].addcmul_(o if o.dtype == acc_dtype else o.to(acc_dtype), weight)
                new_cnt[(slice(None), *lw)].add_(weight)
            del out
        acc, cnt, base = new_acc, new_cnt, s
        final = starts[g + 1] if g + 1 < len(starts) else size[axis]  # no later window reaches below this
        lo, hi = max(emitted, keep[axis].start), min(final, keep[axis].stop)
        if hi > lo:
            sl = [slice(None)] + [keep[d] if d != axis else slice(lo - base, hi - base) for d in range(3)]
            # no later window writes these slices (later buffers start at or after ``final``): normalise in place
            yield lo - keep[axis].start, hi - keep[axis].start, acc[tuple(sl)].div_(cnt[tuple(sl)])
        emitted = max(emitted, final)
