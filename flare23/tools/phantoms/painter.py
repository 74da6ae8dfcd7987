"""Painting of the phantoms' shapes (organs and unlabelled structures) into a slab: signed distance, materials, label."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from flare23.constants import TUMOR_ID
from flare23.tools.phantoms.anatomy import _M, _part_phi


class _Painter:
    """Paints one jittered structure (see :func:`~flare23.tools.phantoms.cases._jitter_organs`) at a time.

    A structure is the union of its parts minus its ``minus`` parts (signed pseudo-distances in mm,
    negative inside), perturbed by the smooth ``shape`` field, clipped to the body cavity and to
    either side of the diaphragm where asked. Its voxels get the structure's materials (a kidney's
    cortex and medulla, the stomach's wall, fluid and gas, ...) and, for an organ, its label. The
    painter remembers each organ's deepest voxel, so that :meth:`ensure_present` can give an organ
    that no voxel centre fell into at least one voxel.
    """

    def __init__(self, grid, dome2d, shape, bubbles, stomach_gas, duodenum_gas, esophagus_air):
        self.grid = grid
        self.dome2d = dome2d  # diaphragm height (canonical z) over (y, x), undeformed
        self.shape = shape  # boundary perturbation field
        self.bubbles = bubbles  # gas field of the colon
        self.stomach_gas = stomach_gas  # canonical y above which the stomach holds gas
        self.duodenum_gas = duodenum_gas
        self.esophagus_air = esophagus_air
        self._argmin = {}  # label -> (smallest phi, its voxel index, material)

    def paint(self, o, k0, k1, mat, lab, cavity_phi):
        """Paint structure ``o`` on slices k0:k1 into the slab arrays ``mat`` and ``lab`` (None: no label).

        ``cavity_phi``: the slab's distance (mm) outside the cavity wall, for structures clipped to the cavity.
        """
        g = self.grid
        (b0, b1), (j0, j1), (i0, i1) = o["box"]
        ka, kb = max(k0, b0), min(k1, b1)
        if ka >= kb or j0 >= j1 or i0 >= i1:
            return
        shape = (kb - ka, j1 - j0, i1 - i0)
        phi = np.full(shape, 1e3, np.float32)

        def local(p):
            """Slices of part p's box inside phi, and its local coordinates; None if disjoint."""
            (c0, c1), (d0, d1), (e0, e1) = p["box"]
            c0, c1, d0, d1, e0, e1 = max(ka, c0), min(kb, c1), max(j0, d0), min(j1, d1), max(i0, e0), min(i1, e1)
            if c0 >= c1 or d0 >= d1 or e0 >= e1:
                return None
            sl = (slice(c0 - ka, c1 - ka), slice(d0 - j0, d1 - j0), slice(e0 - i0, e1 - i0))
            return sl, g.u(o, slice(c0, c1), slice(d0, d1), slice(e0, e1))

        for p in o["parts"]:
            got = local(p)
            if got is not None:
                np.minimum(phi[got[0]], _part_phi(*got[1], p), out=phi[got[0]])
        for p in o["minus"]:
            got = local(p)
            if got is not None:
                np.maximum(phi[got[0]], -_part_phi(*got[1], p), out=phi[got[0]])
        ks, js, is_ = slice(ka, kb), slice(j0, j1), slice(i0, i1)
        phi *= np.float32(o["phi_scale"])
        if o["shape_amp"] > 0:
            phi += np.float32(o["shape_amp"]) * self.shape(ks, js, is_)
        if o["clip"]:
            np.maximum(phi, cavity_phi[ka - k0 : kb - k0, js, is_] + np.float32(1.0), out=phi)
        if o["diaphragm"] and g.cz[kb - 1] + g.dmax / g.S[2] > 20.0:
            qz = g.cz[ks][:, None, None] + g.dZs[js, is_][None]
            np.maximum(phi, qz - (self.dome2d[js, is_][None] - np.float32(4.0)), out=phi)
        if o.get("above_diaphragm"):
            qz = g.cz[ks][:, None, None] + g.dZs[js, is_][None]
            np.maximum(phi, (self.dome2d[js, is_][None] + np.float32(4.0)) - qz, out=phi)
        if o["label"]:
            key = o["label"]
            flat = int(np.argmin(phi))
            val = float(phi.flat[flat])
            if key not in self._argmin or val < self._argmin[key][0]:
                kk, jj, ii = np.unravel_index(flat, phi.shape)
                self._argmin[key] = (val, (ka + kk, j0 + jj, i0 + ii), o["material"])
        inside = phi < 0
        if not inside.any():
            return
        qy = None
        if o["material"] in ("stomach", "duodenum"):
            qy = np.broadcast_to(g.cy[js][None, :, None] + g.dYs[ks, is_][:, None, :], shape)
        sub = mat[ka - k0 : kb - k0, js, is_]
        sub[inside] = self._materials(o, phi, inside, qy, ks, js, is_)
        if lab is not None and o["label"]:
            lab[ka - k0 : kb - k0, js, is_][inside] = o["label"]

    def _materials(self, o, phi, inside, qy, ks, js, is_):
        """Material code(s) of the voxels ``inside`` structure ``o`` (``qy``: canonical y, for gas levels)."""
        kind = o["material"]
        if kind == "esophagus" and self.esophagus_air:
            kind = "esophagus_lumen"
        if kind in _M:
            return _M[kind]
        p = phi[inside]
        if kind == "kidney":
            return np.where(p > -5.0, _M["kidney_cortex"], _M["kidney_medulla"]).astype(np.uint8)
        if kind in ("stomach", "duodenum"):
            wall_t = 4.0 if kind == "stomach" else 2.5
            level = self.stomach_gas if kind == "stomach" else self.duodenum_gas
            y = qy[inside]
            wall = _M["stomach_wall"] if kind == "stomach" else _M["duodenum_wall"]
            fluid = _M["gastric_fluid"] if kind == "stomach" else _M["duodenal_fluid"]
            out = np.where(y > level, _M["gas"], fluid).astype(np.uint8)
            out[p > -wall_t] = wall
            return out
        if kind == "esophagus_lumen":
            return np.where(p < -5.0, _M["gas"], _M["esophagus"]).astype(np.uint8)
        if kind == "heart":
            return np.where(p > -10.0, _M["myocardium"], _M["cardiac_blood"]).astype(np.uint8)
        if kind == "colon":
            bub = self.bubbles(ks, js, is_)[inside]
            return np.where(bub > 0.2, _M["gas"], _M["stool"]).astype(np.uint8)
        if kind == "bladder":
            return np.where(p > -2.5, _M["muscle"], _M["urine"]).astype(np.uint8)
        if kind == "bone":
            return np.where(p > -2.5, _M["cortical_bone"], _M["cancellous_bone"]).astype(np.uint8)
        raise AssertionError(kind)

    def ensure_present(self, label, material):
        """An organ that no voxel centre fell into (thin organs at coarse spacing) gets its deepest voxel."""
        objs = ndimage.find_objects(label, max_label=TUMOR_ID)
        for key, (_, idx, mat) in sorted(self._argmin.items()):
            if objs[key - 1] is None:
                label[idx] = key
                material[idx] = _M["kidney_cortex"] if mat == "kidney" else _M.get(mat, _M["stomach_wall"])
