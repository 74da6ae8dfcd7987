"""Random smooth fields (unit std) of the phantoms: 2D fields and cheap separable-product 3D fields."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def _smooth_2d(rng, c0, c1, sigma):
    """A random smooth function (unit std) on the grid ``c0 x c1`` (world mm), correlation length ``sigma``.

    White noise on a lattice of step sigma / 2 is Gaussian-filtered and sampled with cubic splines.
    """
    step = sigma / 2.0
    lo0, lo1 = float(c0.min()) - 3 * sigma, float(c1.min()) - 3 * sigma
    n0 = int(math.ceil((float(c0.max()) + 3 * sigma - lo0) / step)) + 1
    n1 = int(math.ceil((float(c1.max()) + 3 * sigma - lo1) / step)) + 1
    f = ndimage.gaussian_filter(rng.standard_normal((n0, n1)), 2.0, mode="reflect")
    f = (f - f.mean()) / (f.std() + 1e-12)
    i0 = (np.asarray(c0, float) - lo0) / step
    i1 = (np.asarray(c1, float) - lo1) / step
    g0, g1 = np.meshgrid(i0, i1, indexing="ij")
    return ndimage.map_coordinates(f, [g0, g1], order=3, mode="nearest").astype(np.float32)


class _Field:
    """A smooth random 3D field (unit std) from products of 2D fields, cheap to evaluate on any box.

    T = (A(y, x) B(z, y) + C(z, x) D(y, x) + E(z, y) F(z, x)) / sqrt(3): each plane of the
    volume sees a non-separable pattern, and a box costs two operations per voxel and term.
    """

    def __init__(self, rng, xs, ys, zs, sigma):
        self.yx = [_smooth_2d(rng, ys, xs, sigma) for _ in range(3)]
        self.zy = [_smooth_2d(rng, zs, ys, sigma) for _ in range(2)]
        self.zx = [_smooth_2d(rng, zs, xs, sigma) for _ in range(2)]
        self.norm = np.float32(1.0 / math.sqrt(3.0))

    def __call__(self, ks: slice, js: slice, is_: slice) -> np.ndarray:
        out = self.yx[0][js, is_][None, :, :] * self.zy[0][ks, js][:, :, None]
        out += self.zx[0][ks, is_][:, None, :] * self.yx[1][js, is_][None, :, :]
        out += self.zy[1][ks, js][:, :, None] * self.zx[1][ks, is_][:, None, :]
        out *= self.norm
        return out
