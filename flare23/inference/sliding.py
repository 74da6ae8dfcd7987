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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> tuple[int, ...]:
    """MONAI's step between windows: ``int(roi * (1 - overlap))`` (at least 1), ``roi`` where roi == image."""
    return tuple(int(r) if r == n else max(1, int(r * (1 - overlap))) for n, r in zip(image_size, roi_size))


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
    before = [max(r - n, 0) // 2 for r, n in zip(roi, original)]
    after = [max(r - n, 0) - b for r, n, b in zip(roi, original, before)]
    if any(before) or any(after):
        pad = [v for d in (2, 1, 0) for v in (before[d], after[d])]
        inputs = F.pad(inputs, pad, mode="constant", value=cval)
    size = tuple(int(s) for s in inputs.shape[2:])
    windows = dense_patch_slices(size, roi, scan_interval(size, roi, overlap))
    weight = compute_importance_map(roi, mode="gaussian", sigma_scale=sigma_scale, device=inputs.device, dtype=acc_dtype)
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
        for i in range(0, len(groups[s]), sw_batch_size):
            batch = groups[s][i : i + sw_batch_size]
            out = predictor(torch.cat([inputs[(slice(None), slice(None), *w)] for w in batch]))
            if new_acc is None:
                new_acc = torch.zeros([out.shape[1], *shape], dtype=acc_dtype, device=inputs.device)
                if carry_acc is not None:
                    new_acc.narrow(1 + axis, 0, carry_acc.shape[1 + axis]).copy_(carry_acc)
                    carry_acc = None
            for w, o in zip(batch, out):
                local = list(w)
                local[axis] = slice(int(w[axis].start) - s, int(w[axis].stop) - s)
                new_acc[(slice(None), *local)].addcmul_(o if o.dtype == acc_dtype else o.to(acc_dtype), weight)
                new_cnt[(slice(None), *local)].add_(weight)
            del out
        acc, cnt, base = new_acc, new_cnt, s
        final = starts[g + 1] if g + 1 < len(starts) else size[axis]  # no later window reaches below this
        lo, hi = max(emitted, keep[axis].start), min(final, keep[axis].stop)
        if hi > lo:
            sl = [slice(None)] + [keep[d] if d != axis else slice(lo - base, hi - base) for d in range(3)]
            # no later window writes these slices (later buffers start at or after ``final``): normalise in place
            yield lo - keep[axis].start, hi - keep[axis].start, acc[tuple(sl)].div_(cnt[tuple(sl)])
        emitted = max(emitted, final)
