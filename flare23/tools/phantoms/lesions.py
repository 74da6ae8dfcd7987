"""How the phantoms' tumors look in CT: tumor types by host organ, published tumor-to-parenchyma contrast per
contrast phase, texture and margin, and the measurement of the contrast as rendered (see ``docs/phantoms.md``).

Phases of the phantoms: ``"arterial"`` stands for the late arterial phase (about 35-45 s after injection), which
is the *pancreatic* phase for the pancreas and the *corticomedullary* phase for the kidneys; ``"portal"`` is the
portal venous phase (about 65-75 s), the early *nephrographic* phase for the kidneys.

A tumor's contrast is its mean HU minus the mean HU of its host's reference parenchyma
(:data:`TUMOR_REFERENCE`), both on the renderer's noiseless HU map (material HU plus tissue texture, before
noise and partial-volume blur). Its drawn value (uniform in the :data:`TUMOR_CONTRAST_HU` range of its type
and phase) is met exactly by :func:`finish_tumors`, which solves for the HU of the tumor's body given its
internal pattern (necrosis, rim, capsule, mosaic, soft margin) and the texture, then measures it again.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from flare23.constants import TUMOR_ID
from flare23.tools.phantoms.anatomy import _M

#: Tumor types per host label and their probabilities.
#: Liver: hypovascular metastasis (colorectal and other GI primaries, the most common liver malignancy) and HCC.
#: Kidneys: of renal cell carcinomas about 75 % are clear cell and 10-15 % papillary (van Oostenbrugge et al.,
#: Kidney Cancer 2018), renormalised here to the two. Pancreas: ductal adenocarcinoma, 11-14 % of them visually
#: isoattenuating in the pancreatic phase (Prokesch et al., Radiology 2002: 6/53; Ishigami et al., Eur J Radiol
#: 2009: 8/57). Stomach: adenocarcinoma.
TUMOR_TYPES: dict[int, dict[str, float]] = {
    1: {"metastasis": 0.65, "hcc": 0.35},
    2: {"rcc_clear_cell": 0.8, "rcc_papillary": 0.2},
    13: {"rcc_clear_cell": 0.8, "rcc_papillary": 0.2},
    4: {"pdac": 0.88, "pdac_isoattenuating": 0.12},
    11: {"gastric": 1.0},
}

# fmt: off
#: Tumor contrast (tumor HU minus reference-parenchyma HU, :data:`TUMOR_REFERENCE`) per type and phase: the
#: (low, high) range a tumor's mean contrast is drawn from, uniformly (low end raised where needed to keep the
#: tumor's mean HU >= :data:`TUMOR_MIN_HU`, see :func:`drawn_contrast`). Ranges span about mean +- 1 SD of the
#: cited measurements where a study gives numbers; otherwise the typical absolute attenuations reported for the
#: tumor and the host in that phase. Negative: hypoattenuating ("hypo"), positive: hyperattenuating ("hyper").
TUMOR_CONTRAST_HU: dict[str, dict[str, tuple[float, float]]] = {
    # Hypovascular liver metastasis: clearly hypoattenuating in the portal venous phase (liver ~100-120 HU,
    # metastasis ~40-80 HU), the phase in which they are best detected; hypoattenuating but less conspicuous in
    # the (late) arterial phase, when the liver has enhanced less, often with rim enhancement.
    # Soyer et al., Radiology 2004;231:413-420; Sahani et al., Ann Surg 2014;259:861-872.
    "metastasis": {"arterial": (-40.0, -10.0), "portal": (-70.0, -25.0)},
    # HCC: arterial phase hyperenhancement (non-rim APHE) and portal venous "washout" (hypoattenuating to the
    # liver), the LI-RADS / AASLD major features: Chernyak et al. (LI-RADS v2018), Radiology 2018;289:816-830;
    # Marrero et al. (AASLD 2018), Hepatology 2018;68:723-750. Magnitudes: HCC ~100-130 HU vs liver ~70-85 HU
    # in the late arterial phase; washout is mild (~5-30 HU below the liver).
    "hcc": {"arterial": (15.0, 60.0), "portal": (-30.0, -6.0)},
    # Clear cell RCC: strong, heterogeneous enhancement in the corticomedullary phase (~120-180 HU) but usually
    # below the cortex (~170-220 HU); hypoattenuating to the parenchyma in the nephrographic phase.
    # Kim et al., AJR 2002;178:1499-1506; Zhang et al., Radiology 2007;244:494-504; Young et al., Radiology
    # 2013;267:444-453.
    "rcc_clear_cell": {"arterial": (-90.0, -15.0), "portal": (-100.0, -40.0)},
    # Papillary RCC: hypovascular, enhancing ~20-50 HU (absolute ~50-90 HU) in both phases, well below the
    # cortex / parenchyma. Same sources.
    "rcc_papillary": {"arterial": (-150.0, -90.0), "portal": (-110.0, -60.0)},
    # Pancreatic ductal adenocarcinoma, tumor-pancreas contrast: pancreatic phase 67 +- 19 HU (Lu et al.,
    # Radiology 1996;199:697-701), 75 +- 36 HU (Prokesch et al., Radiology 2002;224:764-768), 60 +- 25 HU
    # (Ishigami et al., Eur J Radiol 2009;69:139-146, PMID 17961951); portal venous / hepatic phase 39 +- 16 HU (Lu),
    # 40.5 +- 23 HU (Ishigami). Largest in the pancreatic phase.
    "pdac": {"arterial": (-90.0, -35.0), "portal": (-60.0, -18.0)},
    # Visually isoattenuating PDAC: 9 +- 11 HU pancreatic / 4 +- 8.5 HU portal (Prokesch 2002); 9.2 +- 3.7 HU /
    # 7.1 +- 4.7 HU (Ishigami 2009); such tumors are smaller (12 +- 5 mm, Ishigami).
    "pdac_isoattenuating": {"arterial": (-14.0, -4.0), "portal": (-10.0, -2.0)},
    # Gastric adenocarcinoma: focal enhancing wall thickening / mass, enhancing more than the normal wall,
    # markedly in the early (arterial) phase: Takao et al., J Comput Assist Tomogr 1998;22:288-294; normalised
    # iodine concentration of cancer above normal mucosa in both phases: Meng et al., Medicine 2017;96:e5878.
    # The least well quantified entry (reported as patterns and iodine concentrations rather than HU).
    "gastric": {"arterial": (15.0, 50.0), "portal": (5.0, 35.0)},
}
# fmt: on

#: Reference parenchyma (material names) of each host label per phase. Kidneys: the cortex in the
#: corticomedullary (arterial) phase, as in the cited studies; cortex and medulla together in the portal
#: (early nephrographic) phase, when the kidney enhances almost homogeneously.
TUMOR_REFERENCE: dict[int, dict[str, tuple[str, ...]]] = {
    1: {"arterial": ("liver",), "portal": ("liver",)},
    2: {"arterial": ("kidney_cortex",), "portal": ("kidney_cortex", "kidney_medulla")},
    13: {"arterial": ("kidney_cortex",), "portal": ("kidney_cortex", "kidney_medulla")},
    4: {"arterial": ("pancreas",), "portal": ("pancreas",)},
    11: {"arterial": ("stomach_wall",), "portal": ("stomach_wall",)},
}

#: Texture and margin per type. ``tex``: amplitude (HU) of the tissue texture field in the tumor (host
#: parenchyma: 6-14 HU). ``margin_mm``: width of a soft transition from host to tumor HU centred on the tumor
#: boundary; its inner half is rendered inside the label, in three depth levels (at most a quarter of the
#: radius; dropped where it would leave the body with more than 1.43 x the mean contrast, e.g. for tumors of
#: few voxels). 0: sharp; the renderer's partial-volume blur adds about half a voxel everywhere. ``rim``:
#: enhancing rim / capsule (minimum diameter mm, thickness mm, HU above the body per phase; a phase not
#: listed: none). ``necrosis``: low-attenuation centre (minimum diameter mm, radius fraction, absolute HU).
#: ``mosaic``: Voronoi nodules of different HU (minimum diameter mm, count, half-range of the offsets, which are
#: made zero-mean).
TUMOR_APPEARANCE: dict[str, dict] = {
    # metastases: peripheral (rim) enhancement, "target" appearance; central necrosis when large
    "metastasis": {
        "tex": 8.0,
        "margin_mm": 0.0,
        "rim": {"min_mm": 15.0, "mm": (1.5, 3.0), "hu": {"arterial": (20.0, 40.0), "portal": (10.0, 25.0)}},
        "necrosis": {"min_mm": 30.0, "frac": (0.3, 0.5), "hu": (10.0, 30.0)},
    },
    # HCC: mosaic architecture and an enhancing capsule in the portal venous phase (LI-RADS features); sharp
    "hcc": {
        "tex": 10.0,
        "margin_mm": 0.0,
        "rim": {"min_mm": 15.0, "mm": (1.0, 2.0), "hu": {"portal": (10.0, 25.0)}},
        "mosaic": {"min_mm": 20.0, "count": (2, 4), "hu": 20.0},
    },
    # clear cell RCC: heterogeneous, necrotic centre when large; pseudocapsule: sharp margin
    "rcc_clear_cell": {"tex": 16.0, "margin_mm": 0.0, "necrosis": {"min_mm": 30.0, "frac": (0.3, 0.55), "hu": (15.0, 35.0)}},
    # papillary RCC: homogeneous, sharp
    "rcc_papillary": {"tex": 5.0, "margin_mm": 0.0},
    # PDAC: infiltrative, ill-defined margin
    "pdac": {"tex": 8.0, "margin_mm": (2.0, 4.0)},
    "pdac_isoattenuating": {"tex": 8.0, "margin_mm": (2.0, 4.0)},
    # gastric cancer: infiltrative wall thickening, soft margin
    "gastric": {"tex": 8.0, "margin_mm": (1.5, 3.0)},
}

#: Tissue codes per tumor: tumor k (0-based, manifest order) uses ``TUMOR_MATERIAL_BASE + TUMOR_CODE_STRIDE * k +
#: part`` for its parts: 0-3 body / mosaic nodules, 4 necrosis, 5 rim or capsule, 6-8 soft-margin levels.
TUMOR_CODE_STRIDE = 10
_NECROSIS, _RIM, _RAMP = 4, 5, 6
# share of the body's contrast in the three depth levels of the margin's inner half: the transition is centred on
# the tumor boundary (half the contrast there), the inner half lies inside the label, the host side is left as is
_RAMP_WEIGHTS = (7.0 / 12.0, 9.0 / 12.0, 11.0 / 12.0)
_MIN_MEAN_WEIGHT = 0.7  # a soft margin is dropped where the body would need > 1.43 x the mean contrast
#: Lowest mean HU of a tumor: the contrast draw is narrowed so that no tumor is darker on average than
#: unenhanced soft tissue (~30-45 HU) where its range allows it (necrotic parts may be darker).
TUMOR_MIN_HU = 35.0


def tumor_type(u: float, host: int) -> str:
    """The type of a tumor in ``host`` for a uniform draw ``u`` in [0, 1) (:data:`TUMOR_TYPES`)."""
    names = list(TUMOR_TYPES[host])
    p = np.cumsum([TUMOR_TYPES[host][n] for n in names])
    return names[min(int(np.searchsorted(p / p[-1], u, side="right")), len(names) - 1)]


def drawn_contrast(u: float, ttype: str, phase: str, host_hu: float | None = None) -> float:
    """The tumor's target contrast (HU) for a uniform draw ``u``: uniform in its :data:`TUMOR_CONTRAST_HU` range.

    With ``host_hu`` (the reference parenchyma's HU) the range's low end is raised, where the range allows
    it, so that the tumor's mean HU is at least :data:`TUMOR_MIN_HU`.
    """
    lo, hi = TUMOR_CONTRAST_HU[ttype][phase]
    if host_hu is not None and TUMOR_MIN_HU - host_hu < hi:
        lo = max(lo, TUMOR_MIN_HU - host_hu)
    return float(lo + u * (hi - lo))


def reference_codes(host: int, phase: str) -> list[int]:
    """Material codes of the reference parenchyma of ``host`` in ``phase``."""
    return [_M[m] for m in TUMOR_REFERENCE[host][phase]]


def _u(rng, value):
    """A uniform draw in ``value`` (low, high), or ``value`` itself."""
    return float(rng.uniform(*value)) if isinstance(value, tuple) else float(value)


def plan_appearance(rng, ttype: str, phase: str, diam: float, mask, rho, sp) -> tuple[np.ndarray, dict]:
    """Parts of one tumor: an int8 part index per voxel of ``mask`` (its box) and the parts' HU model.

    ``rho``: normalised ellipsoid radius per voxel (0 centre, 1 surface), ``sp``: voxel size (z, y, x) mm.
    Part p has HU ``h + a[p] * c + b[p]`` (``h``: reference parenchyma, ``c``: the body's contrast, solved by
    :func:`solve_hu`) or the absolute HU ``v[p]`` where not NaN, and texture amplitude ``tex[p]``.
    """
    spec = TUMOR_APPEARANCE[ttype]
    n = TUMOR_CODE_STRIDE
    a, b, v = np.ones(n), np.zeros(n), np.full(n, np.nan)
    tex = np.full(n, spec["tex"], float)
    parts = np.zeros(mask.shape, np.int8)
    r = diam / 2.0
    # depth below the tumor surface (mm): the ellipsoid's, or the voxel grid's where the host cut the ellipsoid
    edt = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=sp)[1:-1, 1:-1, 1:-1] - 0.5 * float(np.min(sp))
    depth = np.minimum((1.0 - rho) * r, edt).clip(min=0.0)
    feats: dict = {"heterogeneity_hu": spec["tex"]}
    mos = spec.get("mosaic")
    if mos and diam >= mos["min_mm"]:
        k = int(rng.integers(mos["count"][0], mos["count"][1] + 1))
        idx = np.argwhere(mask)
        seeds = idx[rng.choice(len(idx), size=min(k, len(idx)), replace=False)] * sp
        d = ((idx[:, None, :] * sp - seeds[None]) ** 2).sum(axis=2)
        parts[tuple(idx.T)] = np.argmin(d, axis=1).astype(np.int8)
        off = rng.uniform(-mos["hu"], mos["hu"], len(seeds))
        b[: len(seeds)] = off - np.average(off, weights=np.bincount(parts[mask], minlength=len(seeds)) + 1e-9)
        feats["mosaic_nodules"] = len(seeds)
    nec = spec.get("necrosis")
    if nec and diam >= nec["min_mm"]:
        frac = _u(rng, nec["frac"])
        core = mask & (rho < frac)
        if 0 < core.sum() <= 0.25 * mask.sum():
            parts[core] = _NECROSIS
            a[_NECROSIS], v[_NECROSIS], tex[_NECROSIS] = 0.0, _u(rng, nec["hu"]), 3.0
            feats["necrosis_radius_fraction"] = round(frac, 2)
    rim = spec.get("rim")
    if rim and diam >= rim["min_mm"] and phase in rim["hu"]:
        thick = _u(rng, rim["mm"])
        shell = mask & (depth < thick) & (parts != _NECROSIS)
        if shell.any() and shell.sum() < mask.sum():
            parts[shell] = _RIM
            b[_RIM] = _u(rng, rim["hu"][phase])
            feats["rim_mm" if ttype != "hcc" else "capsule_mm"] = round(thick, 2)
    margin = min(_u(rng, spec["margin_mm"]) if isinstance(spec["margin_mm"], tuple) else float(spec["margin_mm"]), r / 4.0)
    if margin > 0:
        w = depth / (0.5 * margin)
        level = np.where(mask & (w < 1.0), np.minimum(w * 3.0, 2.0).astype(np.int8), -1)
        weights = np.where(level >= 0, np.take(_RAMP_WEIGHTS, level.clip(0)), 1.0)[mask]
        if float(weights.mean()) >= _MIN_MEAN_WEIGHT:
            sel = level >= 0
            parts[sel] = _RAMP + level[sel]
            a[_RAMP : _RAMP + 3] = _RAMP_WEIGHTS
            feats["margin_mm"] = round(margin, 2)
    return parts, {"a": a, "b": b, "v": v, "tex": tex, "features": feats}


def solve_hu(hu, tex, code0: int, model: dict, target: float, h: float, counts, tex_sums) -> float:
    """Set the HU and texture of the tumor's codes so that its mean noiseless HU is ``h + target``; returns the body's contrast.

    ``counts[p]``: voxels of part p; ``tex_sums[p]``: the sum of the texture field over them.
    """
    a, b, v, t = model["a"], model["b"], model["v"], model["tex"]
    n = np.asarray(counts, float)
    rel = np.isnan(v) & (n > 0)
    total = n.sum()
    rest = (n[rel] * (h + b[rel])).sum() + (n[~rel] * np.nan_to_num(v[~rel])).sum() + (t * np.asarray(tex_sums)).sum()
    c = (total * (h + target) - rest) / float((n[rel] * a[rel]).sum())
    for p in range(len(a)):
        hu[code0 + p] = v[p] if not np.isnan(v[p]) else h + a[p] * c + b[p]
        tex[code0 + p] = t[p]
    return float(c)


def _noiseless(material, hu, tex, texture, box, mask) -> np.ndarray:
    """The renderer's noiseless HU (material HU + texture) at the voxels ``mask`` of ``box`` (z, y, x slices), float64."""
    m = material[box][mask]
    return hu[m].astype(np.float64) + tex[m].astype(np.float64) * texture(*box)[mask]


def _tumor_mask(material, box, code0):
    m = material[box]
    return (m >= code0) & (m < code0 + TUMOR_CODE_STRIDE)


def _reference(organs_map, label, material, hu, tex, texture, host, phase, hbox):
    """Mean noiseless HU of the host's reference parenchyma (tumors excluded)."""
    ref = (organs_map[hbox] == host) & (label[hbox] != TUMOR_ID) & np.isin(material[hbox], reference_codes(host, phase))
    if not ref.any():  # the tumors took the whole reference: fall back on the drawn material HU
        return float(np.mean([hu[c] for c in reference_codes(host, phase)]))
    return float(_noiseless(material, hu, tex, texture, hbox, ref).mean())


def finish_tumors(tumors: list[dict], material, label, organs_map, hu, tex, texture, noise_std: float) -> None:
    """Calibrate each tumor's HU to its drawn contrast (texture included) and add the measured manifest fields.

    Updates ``hu`` / ``tex`` in place, replaces each tumor dict's private ``_draw`` by ``contrast_hu``
    (measured on the noiseless HU map after calibration), ``noise_sd_hu`` and ``cnr``.
    """
    objs = ndimage.find_objects(organs_map, max_label=TUMOR_ID)
    for t in tumors:
        d = t["_draw"]
        host, phase, code0, box = t["host"], t["phase"], d["code0"], d["box"]
        hbox = objs[host - 1]
        h = _reference(organs_map, label, material, hu, tex, texture, host, phase, hbox)
        parts = material[box].astype(np.int64) - code0
        inside = _tumor_mask(material, box, code0)
        field = texture(*box)[inside]
        counts = np.bincount(parts[inside], minlength=TUMOR_CODE_STRIDE)
        sums = np.bincount(parts[inside], weights=field, minlength=TUMOR_CODE_STRIDE)
        solve_hu(hu, tex, code0, d["model"], d["target"], h, counts, sums)
    for t in tumors:  # measured after all tumors are set: a later tumor may sit in the same host
        d = t.pop("_draw")
        host, phase, code0, box = t["host"], t["phase"], d["code0"], d["box"]
        h = _reference(organs_map, label, material, hu, tex, texture, host, phase, objs[host - 1])
        mean = float(_noiseless(material, hu, tex, texture, box, _tumor_mask(material, box, code0)).mean())
        contrast = mean - h
        t["contrast_hu"] = round(contrast, 1)
        t["noise_sd_hu"] = round(float(noise_std), 2)
        t["cnr"] = round(abs(contrast) / float(noise_std), 2)
