"""Pass 2 of a phantom: tumors (label 14) inside host organs, one voxel (26-neighbourhood) away from the host's boundary."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from flare23.constants import LABEL_KEYS, TUMOR_ID
from flare23.tools.phantoms.anatomy import TUMOR_COUNT_PROBS, TUMOR_DIAMETER_MM, TUMOR_HOSTS, TUMOR_MATERIAL_BASE, _axes
from flare23.tools.phantoms.cases import _choice
from flare23.tools.phantoms.lesions import (
    TUMOR_CODE_STRIDE,
    drawn_contrast,
    plan_appearance,
    reference_codes,
    solve_hu,
    tumor_type,
)


class _TumorPass:
    """Places a case's tumors: ellipsoids, 5-60 mm, with a wobbly boundary when large, of a type per host.

    Paints ``label`` (TUMOR_ID) and ``material`` (tumor k: codes ``TUMOR_MATERIAL_BASE + TUMOR_CODE_STRIDE * k +
    part``, its parts from :func:`~flare23.tools.phantoms.lesions.plan_appearance`) in place and sets each
    part's HU and texture in the ``hu`` / ``tex`` tables, provisionally (without the texture field, which
    :func:`~flare23.tools.phantoms.lesions.finish_tumors` adds). The hosts are found in ``organs_map``, the
    organ labels before any tumor.
    """

    def __init__(self, case, grid, shape, label, material, hu, tex):
        self.case = case
        self.grid = grid
        self.shape = shape  # boundary perturbation field
        self.label, self.material = label, material
        self.hu, self.tex = hu, tex
        self.sp = np.array([case["spacing"][2], case["spacing"][1], case["spacing"][0]])  # (z, y, x)

    def run(self, organs_map) -> list[dict]:
        """Place 1-3 tumors (:data:`TUMOR_COUNT_PROBS`); returns their descriptions (centre in world mm)."""
        rng = np.random.default_rng([self.case["seed"], 3])
        n = int(_choice(rng, TUMOR_COUNT_PROBS))
        host_ids = list(TUMOR_HOSTS)
        objs = ndimage.find_objects(organs_map, max_label=14)
        out = []
        for _ in range(n):
            order = list(rng.permutation(len(host_ids)))
            first = _choice(rng, TUMOR_HOSTS)
            order = [host_ids.index(first)] + [i for i in order if host_ids[i] != first]
            for hi in order:
                host = host_ids[hi]
                if objs[host - 1] is None:
                    continue
                tumor = self._place(rng, organs_map, host, objs[host - 1], len(out))
                if tumor is not None:
                    out.append(tumor)
                    break
        return out

    def _place(self, rng, organs_map, host, box, index) -> dict | None:
        """Tumor number ``index`` in ``host`` (bounding ``box``); None, drawing nothing, if the host has no room."""
        sp = self.sp
        box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in box)
        hmask = organs_map[box] == host
        core = ndimage.binary_erosion(hmask, structure=np.ones((3, 3, 3), bool))
        core &= self.label[box] == host  # not inside an earlier tumor
        if not core.any():
            return None
        dist = ndimage.distance_transform_edt(core, sampling=sp)
        dmax = float(dist.max())
        lo, hi_d = TUMOR_DIAMETER_MM
        hi_d = min(hi_d, 2.0 * dmax + float(sp.min()))
        diam = float(np.clip(np.exp(rng.normal(np.log(22.0), 0.6)), lo, max(lo, hi_d)))
        r = diam / 2.0
        cand = np.argwhere(dist >= min(r, dmax) * 0.999)
        c = cand[int(rng.integers(len(cand)))]
        f = rng.uniform(0.85, 1.15, 3)
        radii = r * f / np.cbrt(np.prod(f))  # equivalent-sphere diameter = diam
        rot = _axes(rng.normal(size=3), rng.normal(size=3))
        tumor, tb, rho = self._ellipsoid(core, box, c, radii, rot, r)
        tumor[tuple(c)] = True
        cz, cy, cx = (int(v) for v in c)
        # the two draws that once gave hypo / hyper and the HU offset: the geometry of later tumors stays put
        u_type, u_contrast = rng.random(), rng.random()
        phase = self.case["phase"]
        ttype = tumor_type(u_type, host)
        sub = tumor[tb]
        arng = np.random.default_rng([self.case["seed"], 3, 10 + index])
        parts, model = plan_appearance(arng, ttype, phase, diam, sub, np.where(sub, rho, 1.0), sp)
        code0 = TUMOR_MATERIAL_BASE + TUMOR_CODE_STRIDE * index
        self.label[box][tumor] = TUMOR_ID
        self.material[box][tb][sub] = code0 + parts[sub]
        # provisional HU: reference parenchyma from the HU table, texture left out (finish_tumors adds it)
        refc = reference_codes(host, phase)
        ref = (organs_map[box] == host) & (self.label[box] == host) & np.isin(self.material[box], refc)
        h = float(self.hu[self.material[box][ref]].mean()) if ref.any() else float(self.hu[refc].mean())
        target = drawn_contrast(u_contrast, ttype, phase, h)
        counts = np.bincount(parts[sub], minlength=TUMOR_CODE_STRIDE)
        solve_hu(self.hu, self.tex, code0, model, target, h, counts, np.zeros(TUMOR_CODE_STRIDE))
        tbox = tuple(slice(box[a].start + tb[a].start, box[a].start + tb[a].stop) for a in range(3))
        zyx = np.array([box[0].start + cz, box[1].start + cy, box[2].start + cx])
        return {
            "host": int(host),
            "host_name": LABEL_KEYS[host],
            "type": ttype,
            "phase": phase,
            "kind": "hypo" if target < 0 else "hyper",
            "hu_delta": round(target, 1),
            "diameter_mm": round(diam, 2),
            "center_mm": [round(float(v), 3) for v in self.grid.world(zyx)],
            "voxels": int(tumor.sum()),
            "appearance": model.pop("features"),
            "_draw": {"code0": code0, "target": target, "model": model, "box": tbox},  # for finish_tumors
        }

    def _ellipsoid(self, core, box, c, radii, rot, r):
        """Mask (shape of ``core``, inside ``core``) of the rotated ellipsoid centred on voxel ``c`` of the host ``box``.

        Also returns the ellipsoid's own box ``tb`` (slices of ``core``) and its normalised radius there
        (0 at the centre, 1 on the surface).
        """
        sp = self.sp
        # evaluate the ellipsoid on its own box only
        ext = np.ceil(1.4 * radii.max() / sp).astype(int) + 1
        tb = tuple(slice(max(0, int(c[a] - ext[a])), min(core.shape[a], int(c[a] + ext[a] + 1))) for a in range(3))
        g = np.ogrid[tb[0], tb[1], tb[2]]
        dz, dy, dx = ((g[a] - c[a]).astype(np.float32) * np.float32(sp[a]) for a in range(3))
        s = None
        for i in range(3):  # rot rows are local axes in (x, y, z) world order
            v = (dx * rot[i, 0] + dy * rot[i, 1] + dz * rot[i, 2]) / np.float32(radii[i])
            s = v * v if s is None else s + v * v
        if r > 8:
            wob = 1.0 + 0.12 * self.shape(*(slice(box[a].start + tb[a].start, box[a].start + tb[a].stop) for a in range(3)))
            s = s / (wob * wob)
        tumor = np.zeros(core.shape, bool)
        tumor[tb] = (s <= 1.0) & core[tb]
        return tumor, tb, np.sqrt(s)
