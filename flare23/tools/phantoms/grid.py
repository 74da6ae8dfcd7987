"""The voxel grid of one phantom and its smooth random deformation into the canonical patient frame."""

from __future__ import annotations

import math

import numpy as np

from flare23.tools.phantoms.fields import _smooth_2d


class _Grid:
    """World coordinates of one case's voxels and their canonical coordinates; internal arrays are ordered (z, y, x).

    Canonical coordinates are ``q = (world + d - T) / S`` (body scale ``S``, translation ``T``) with
    a smooth deformation ``d`` kept as three 2D fields, ``d_x(z, y)``, ``d_y(z, x)`` and ``d_z(y, x)``
    (mm), so that no 3D displacement field is stored.
    """

    def __init__(self, case: dict, rng):
        nx, ny, nz = case["shape_ras"]
        self.nx, self.ny, self.nz = nx, ny, nz
        sx, sy, sz = case["spacing"]
        ox, oy, oz = case["origin_ras"]
        self.xs = (ox + sx * np.arange(nx)).astype(np.float64)
        self.ys = (oy + sy * np.arange(ny)).astype(np.float64)
        self.zs = (oz + sz * np.arange(nz)).astype(np.float64)
        self.S = case["scale"]
        self.T = case["translation"]
        # smooth deformation: d_x(z, y), d_y(z, x), d_z(y, x), in mm
        amp = rng.uniform(2.0, 6.0, 3)
        sig = rng.uniform(60.0, 100.0)
        self.dX = _smooth_2d(rng, self.zs, self.ys, sig) * np.float32(amp[0])
        self.dY = _smooth_2d(rng, self.zs, self.xs, sig) * np.float32(amp[1])
        self.dZ = _smooth_2d(rng, self.ys, self.xs, sig) * np.float32(amp[2])
        self.dmax = float(max(np.abs(self.dX).max(), np.abs(self.dY).max(), np.abs(self.dZ).max()))
        # canonical coordinates = (world + d - T) / S, separable parts
        self.cx = ((self.xs - self.T[0]) / self.S[0]).astype(np.float32)
        self.cy = ((self.ys - self.T[1]) / self.S[1]).astype(np.float32)
        self.cz = ((self.zs - self.T[2]) / self.S[2]).astype(np.float32)
        self.dXs = self.dX / np.float32(self.S[0])
        self.dYs = self.dY / np.float32(self.S[1])
        self.dZs = self.dZ / np.float32(self.S[2])

    def index_box(self, qlo, qhi):
        """Array index ranges (z, y, x) covering canonical box [qlo, qhi] (deformation included)."""
        wlo = np.asarray(qlo) * self.S + self.T - self.dmax - 1.0
        whi = np.asarray(qhi) * self.S + self.T + self.dmax + 1.0
        out = []
        for axis, coords in ((2, self.zs), (1, self.ys), (0, self.xs)):
            step = coords[1] - coords[0] if len(coords) > 1 else 1.0
            i0 = int(math.floor((wlo[axis] - coords[0]) / step))
            i1 = int(math.ceil((whi[axis] - coords[0]) / step)) + 1
            out.append((max(0, i0), min(len(coords), i1)))
        return out

    def q(self, kz, jy, ix):
        """Canonical coordinates (3 arrays broadcastable to the box) of the sub-box."""
        qx = self.cx[ix][None, None, :] + self.dXs[kz, jy][:, :, None]
        qy = self.cy[jy][None, :, None] + self.dYs[kz, ix][:, None, :]
        qz = self.cz[kz][:, None, None] + self.dZs[jy, ix][None, :, :]
        return qx, qy, qz

    def u(self, o, ks, js, is_):
        """Local coordinates u = M q + m of structure ``o`` on a sub-box, from 2D terms (2 adds per voxel)."""
        M, m = o["M"], o["m"]
        out = []
        for r in range(3):
            p = M[r, 0] * self.dXs[ks, js] + (M[r, 1] * self.cy[js])[None, :] + (M[r, 2] * self.cz[ks] + m[r])[:, None]
            q = M[r, 1] * self.dYs[ks, is_] + (M[r, 0] * self.cx[is_])[None, :]
            w = p[:, :, None] + q[:, None, :]
            w += (M[r, 2] * self.dZs[js, is_])[None, :, :]
            out.append(w)
        return out

    def world(self, zyx) -> np.ndarray:
        """World RAS+ mm of an internal (z, y, x) voxel index."""
        return np.array([self.xs[zyx[2]], self.ys[zyx[1]], self.zs[zyx[0]]])
