"""Pass 1 of a phantom (the anatomy pass): the material map and the organ labels, slab by slab along z."""

from __future__ import annotations

import cc3d
import numpy as np
from scipy import ndimage

from flare23.constants import TUMOR_ID
from flare23.tools.phantoms.anatomy import _LUNG_TOP, _M, _SLAB_VOXELS, _SPINE_Y, _SPINE_Z, _profile
from flare23.tools.phantoms.skeleton import _paint_pelvis, _paint_ribs, _paint_spine, _spine_box


def _dome(dome_shift, qx, qy):
    """Diaphragm height (canonical z) over (qx, qy): right and left domes, shifted by the case's ``dome_shift``."""
    dr, dl = dome_shift
    out = None
    for x0, y0, peak in ((55.0, 10.0, 118.0 + dr), (-60.0, 0.0, 106.0 + dl)):
        ddx, ddy = qx - np.float32(x0), qy - np.float32(y0)
        h = np.float32(peak) - np.float32(0.01) * ddx * ddx - np.where(ddy < 0, np.float32(0.015), np.float32(0.004)) * ddy * ddy
        out = h if out is None else np.maximum(out, h)
    return np.maximum(out, np.float32(25.0)).astype(np.float32)


class _AnatomyPass:
    """Fills ``material`` (tissue codes) and ``label`` (organ ids), both (z, y, x), slab by slab.

    On each slab: body wall (skin, fat, muscle) around the visceral fat of the cavity, the CT table,
    thorax (diaphragm, lungs, mediastinum, sternum), bowel loops, bones
    (:mod:`~flare23.tools.phantoms.skeleton`), then the unlabelled structures and the organs (by the
    painter). The body wall, lungs, bowel region and bones use undeformed canonical coordinates (they
    are separable, hence cheap); the organs and other shapes use the deformed ones. At the end each
    organ keeps its largest connected part and every organ gets at least one voxel.
    """

    def __init__(self, case, grid, dome2d, painter, bowel, bubbles, bowel_gas):
        self.case = case
        self.grid = grid
        self.dome2d = dome2d  # diaphragm height (canonical z) over (y, x), undeformed
        self.painter = painter
        self.bowel = bowel  # bowel-loop field
        self.bubbles = bubbles  # bowel-gas field
        self.bowel_gas = bowel_gas  # threshold on the bubble field

    def run(self, organs, others) -> tuple[np.ndarray, np.ndarray]:
        """The case's (material, label) volumes; sets the index boxes of the structures and their parts."""
        g = self.grid
        nz, ny, nx = g.nz, g.ny, g.nx
        self.material = np.zeros((nz, ny, nx), np.uint8)
        self.label = np.zeros((nz, ny, nx), np.uint8)
        for o in organs + others:
            o["box"] = g.index_box(*o["qbox"])
            for p in o["parts"] + o["minus"]:
                p["box"] = g.index_box(*p["qbox"])
        self._spine_box = _spine_box(g)
        self._table2d = self._table_mask()
        step = max(1, _SLAB_VOXELS // (nx * ny))
        for k0 in range(0, nz, step):
            self._slab(k0, min(nz, k0 + step), organs, others)
        self._keep_largest()
        self.painter.ensure_present(self.label, self.material)
        return self.material, self.label

    def _keep_largest(self):
        """Each organ keeps its largest 26-connected part (stray voxels cut off by other organs become fat)."""
        for key, box in enumerate(ndimage.find_objects(self.label, max_label=TUMOR_ID - 1), start=1):
            if box is None:
                continue
            mask = self.label[box] == key
            cc, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
            if n > 1:
                sizes = np.bincount(cc.ravel())
                sizes[0] = 0
                drop = mask & (cc != int(np.argmax(sizes)))
                self.label[box][drop] = 0
                self.material[box][drop] = _M["visceral_fat"]

    def _slab(self, k0, k1, organs, others):
        """Body, table, thorax, bowel, bones and then every shape, on slices k0:k1."""
        g = self.grid
        ks = slice(k0, k1)
        mat = self.material[ks]
        zc = g.cz[ks]
        cavity, wall, dy, radial = self._body_wall(mat, zc)
        sel = self._table2d[None] & (mat == _M["air"])
        mat[sel] = _M["table"]
        self._thorax(mat, zc, cavity)
        self._bowel(mat, k0, k1, zc, cavity)
        _paint_spine(mat, k0, k1, zc, self._spine_box, g.cx, g.cy)
        _paint_pelvis(mat, zc, g.cx, g.cy)
        _paint_ribs(mat, zc, g.cx, dy, radial)
        for o in others:
            self.painter.paint(o, k0, k1, mat, None, wall)
        for o in organs:
            self.painter.paint(o, k0, k1, mat, self.label[ks], wall)

    def _body_wall(self, mat, zc):
        """Skin, subcutaneous fat, muscle wall and the cavity's visceral fat on a slab.

        Returns ``cavity`` (inside the muscle wall), ``wall`` (mm outside the cavity wall along the
        ray from the body axis; negative inside), ``dy`` (canonical y from the profile's centre, (k, y))
        and ``radial`` (the same distance as ``wall`` in canonical mm).
        """
        a, yc, ba, bp = (np.asarray(v, np.float32) for v in _profile(zc))
        x, y = self.grid.cx, self.grid.cy
        lay = self.case["layers"]
        dy = y[None, :] - yc[:, None]  # (k, y)
        dyn = dy / np.where(dy > 0, ba[:, None], bp[:, None])
        xa = (x[None, :] / a[:, None]) ** 2  # (k, x)
        rho = xa[:, None, :] + (dyn * dyn)[:, :, None]
        np.sqrt(rho, out=rho)
        rr = (x * x)[None, None, :] + (dy * dy)[:, :, None]
        np.sqrt(rr, out=rr)
        # distance (mm) outside the cavity wall along the ray from the body axis
        radial = rr / np.maximum(rho, np.float32(1e-3))
        np.subtract(rr, radial, out=radial)
        wall = radial * np.float32(0.5 * (self.grid.S[0] + self.grid.S[1]))
        cavity = rho < 1.0
        # muscle + fat thickness, between anterior, lateral and posterior values
        dc = np.clip(dyn, -1.0, 1.0)
        fat = (
            np.float32(lay["fat_lateral"] + lay["muscle"])
            + np.float32(lay["fat_anterior"] - lay["fat_lateral"]) * np.maximum(dc, 0) ** 2
        )
        fat += np.float32(lay["fat_posterior"] - lay["fat_lateral"]) * np.minimum(dc, 0) ** 2
        fat = fat[:, :, None]
        mat[wall < fat + np.float32(lay["skin"])] = _M["skin"]
        mat[wall < fat] = _M["fat"]
        mat[wall < np.float32(lay["muscle"])] = _M["muscle"]
        mat[cavity] = _M["visceral_fat"]
        return cavity, wall, dy, radial

    def _table_mask(self):
        """The CT table under the patient's back, (y, x)."""
        g = self.grid
        lay = self.case["layers"]
        _, yc, _, bp = _profile(0.0)
        back = (yc - bp) * g.S[1] + g.T[1] - lay["muscle"] - lay["fat_posterior"] - lay["skin"] - 2.0
        xw = g.xs - g.T[0]
        top = back + 0.0006 * xw**2
        ty = g.ys[:, None]
        return (ty <= top[None, :]) & (ty > top[None, :] - 7.0) & (np.abs(xw)[None, :] < 230.0)

    def _thorax(self, mat, zc, cavity):
        """Diaphragm, mediastinal fat, lungs, the muscle above the lungs and the sternum."""
        if zc.max() < 20.0:
            return
        k = int(np.argmax(zc >= 20.0))
        mat, zc, cavity = mat[k:], zc[k:], cavity[k:]
        zz = zc[:, None, None]
        x, y = self.grid.cx, self.grid.cy
        ys = np.interp(zc, _SPINE_Z, _SPINE_Y).astype(np.float32)
        medi = (np.abs(x + np.float32(8.0)) < np.float32(30.0))[None, None, :] & (y[None, :] > ys[:, None] - np.float32(5.0))[
            :, :, None
        ]
        above = cavity & (zz > self.dome2d[None])
        mat[above] = _M["muscle"]  # diaphragm (kept where the lung does not reach)
        mat[above & medi] = _M["visceral_fat"]  # mediastinal fat
        mat[cavity & (zz > self.dome2d[None] + np.float32(4.0)) & (zz < _LUNG_TOP) & ~medi] = _M["lung"]
        mat[cavity & (zz >= _LUNG_TOP)] = _M["muscle"]
        st = (zc > 170.0) & (zc < 370.0)
        if st.any():
            _, yc, ba, _ = (np.asarray(v, np.float32) for v in _profile(zc))
            sy = (((y[None, :] - yc[:, None] - ba[:, None] - 6.0) / 7.0) ** 2)[:, :, None]
            sel = st[:, None, None] & (((x / 16.0) ** 2)[None, None, :] + sy < 1.0)
            mat[sel] = _M["cancellous_bone"]

    def _bowel(self, mat, k0, k1, zc, cavity):
        """Small-bowel loops (wall, fluid, gas) in the lower abdominal cavity."""
        zmask = (zc > -235.0) & (zc < -25.0)
        if not zmask.any():
            return
        kk = np.nonzero(zmask)[0]
        ka, kb = int(kk[0]), int(kk[-1]) + 1
        g = self.grid
        x, y = g.cx, g.cy
        zz = zc[ka:kb][:, None, None]
        region = cavity[ka:kb] & ((y > -15.0)[None, :, None] & (np.abs(x) < 110.0)[None, None, :])
        region &= ~((zz < -200.0) & (y < 10.0)[None, :, None])
        ks = slice(k0 + ka, k0 + kb)
        af = np.abs(self.bowel(ks, slice(0, g.ny), slice(0, g.nx)))
        lumen = region & (af < 0.32)
        m = mat[ka:kb]
        m[region & (af >= 0.32) & (af < 0.45)] = _M["bowel_wall"]
        m[lumen] = _M["bowel_fluid"]
        m[lumen & (self.bubbles(ks, slice(0, g.ny), slice(0, g.nx)) > self.bowel_gas)] = _M["gas"]
