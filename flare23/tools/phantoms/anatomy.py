"""The phantoms' canonical anatomy: body profiles, organ shapes and materials (millimetres, RAS+, origin at L1)."""

from __future__ import annotations

import numpy as np

from flare23.constants import ORGAN_IDS, PARTIAL_FIVE_ORGANS, TUMOR_ID

# --------------------------------------------------------------------------------------------
# Public constants
# --------------------------------------------------------------------------------------------

#: Partial-label kinds and their share of cases. FLARE 2023 gives 2200 partially labelled scans:
#: about 10 % with all 13 organs, about 40 % with liver, kidneys, spleen and pancreas (+ tumor)
#: and about half with the tumor only (an approximation of the challenge's data description).
PARTIAL_PROPORTIONS: dict[str, float] = {"all": 0.1, "five": 0.4, "tumor": 0.5}
#: Label ids kept by each partial kind (tumor is kept wherever the case has one).
PARTIAL_KEEP: dict[str, tuple[int, ...]] = {
    "all": tuple(ORGAN_IDS) + (TUMOR_ID,),
    "five": tuple(PARTIAL_FIVE_ORGANS) + (TUMOR_ID,),
    "tumor": (TUMOR_ID,),
}
#: Per-organ error of the pseudo labels: a one-voxel in-plane boundary erosion or dilation
#: (the typical error of a model's prediction), or none.
PSEUDO_ERROR_PROBS: dict[str, float] = {"none": 0.5, "erode": 0.25, "dilate": 0.25}
#: Share of cases whose pseudo labels miss one small organ entirely.
PSEUDO_MISSED_FRACTION = 0.3
#: The small organs that a pseudo label may miss: adrenals, gallbladder, esophagus.
PSEUDO_SMALL_ORGANS: tuple[int, ...] = (7, 8, 9, 10)
#: Tumor host organs and their probabilities (liver lesions dominate FLARE's tumor class).
TUMOR_HOSTS: dict[int, float] = {1: 0.45, 2: 0.125, 13: 0.125, 4: 0.15, 11: 0.15}
#: Tumor diameter range in mm (log-normal, median 22 mm, clipped to the range and to the host's room).
TUMOR_DIAMETER_MM = (5.0, 60.0)
#: Version of the phantom generator's output, recorded in ``phantoms.json`` (settings and each case). "2":
#: tumors by type with published contrast per host and phase (``lesions.py``); the same seed gives the same
#: anatomy and tumor geometry as "1" but different tumor HU, texture and manifest fields, and different kidney
#: medulla HU in the portal phase.
PHANTOM_VERSION = "2"
#: Number of tumors in a case with tumors, with probabilities.
TUMOR_COUNT_PROBS: dict[int, float] = {1: 0.6, 2: 0.25, 3: 0.15}
#: Array orientations (nibabel axis codes) and their probabilities.
ORIENTATIONS: dict[str, float] = {"RAS": 0.4, "LPS": 0.35, "LAS": 0.25}
#: Scan ranges: canonical z of the lowest and highest slice (uniform in the given intervals, mm).
SCAN_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "upper_abdomen": ((-118.0, -102.0), (132.0, 158.0)),
    "abdomen": ((-200.0, -160.0), (135.0, 170.0)),
    "abdomen_pelvis": ((-315.0, -280.0), (135.0, 170.0)),
    "chest_abdomen_pelvis": ((-315.0, -280.0), (335.0, 385.0)),
}
#: Contrast phases and their probabilities.
PHASES: dict[str, float] = {"portal": 0.7, "arterial": 0.3}
#: Default share of cases with tumors.
TUMOR_FRACTION = 0.6

#: Sizes. ``inplane`` / ``slice``: spacing ranges in mm (tiny derives its spacing from the body
#: so that it fits 64 x 64); ``ranges``: scan-range names with probabilities.
SIZES: dict[str, dict] = {
    "tiny": {
        "matrix": 64,
        "slices": 32,
        "slice": (4.0, 12.0),
        "ranges": {"upper_abdomen": 1.0},
        "body_scale": (0.9, 1.05),
        "fat_mm": (8.0, 25.0),
    },
    "small": {
        "matrix": 128,
        "inplane": (2.5, 3.0),
        "slice": (2.5, 5.0),
        "slices_range": (40, 80),
        "ranges": {"upper_abdomen": 0.5, "abdomen": 0.5},
        "body_scale": (0.88, 1.1),
        "fat_mm": (8.0, 35.0),
    },
    "full": {
        "matrix": 512,
        "inplane": (0.6, 1.0),
        "slice": (0.8, 5.0),
        # common reconstruction intervals and how often they occur
        "slice_choices": {0.8: 0.08, 1.0: 0.12, 1.25: 0.1, 1.5: 0.08, 2.0: 0.1, 2.5: 0.12, 3.0: 0.1, 5.0: 0.3},
        "ranges": {"upper_abdomen": 0.2, "abdomen": 0.3, "abdomen_pelvis": 0.35, "chest_abdomen_pelvis": 0.15},
        "body_scale": (0.88, 1.12),
        "fat_mm": (8.0, 45.0),
    },
}

#: Tissue (material) codes of the ``tissue`` map returned by :func:`make_phantom`.
MATERIALS: dict[str, int] = {
    "air": 0,
    "table": 1,
    "skin": 2,
    "fat": 3,
    "muscle": 4,
    "visceral_fat": 5,
    "lung": 6,
    "cancellous_bone": 7,
    "cortical_bone": 8,
    "disc": 9,
    "csf": 10,
    "cartilage": 11,
    "myocardium": 12,
    "cardiac_blood": 13,
    "bowel_wall": 14,
    "bowel_fluid": 15,
    "stool": 16,
    "gas": 17,
    "urine": 18,
    "artery": 19,
    "liver": 20,
    "kidney_cortex": 21,
    "kidney_medulla": 22,
    "spleen": 23,
    "pancreas": 24,
    "aorta": 25,
    "ivc": 26,
    "adrenal": 27,
    "bile": 28,
    "esophagus": 29,
    "stomach_wall": 30,
    "gastric_fluid": 31,
    "duodenum_wall": 32,
    "duodenal_fluid": 33,
    "vein": 34,
}
#: Material code of tumor number k (0-based) is ``TUMOR_MATERIAL_BASE + k``.
TUMOR_MATERIAL_BASE = 40
#: Bone materials (for tests and statistics).
BONE_MATERIALS: tuple[int, ...] = (MATERIALS["cancellous_bone"], MATERIALS["cortical_bone"])

_M = MATERIALS
_HU_CLIP = (-1024, 3071)
_SLAB_VOXELS = 1 << 20  # voxels per slab of the anatomy pass (small enough to stay in cache)
_IMAGE_SLAB_VOXELS = 1 << 22  # voxels per slab of the image pass (which has a halo)
_TRUNCATE = 3.0  # Gaussian blur kernels are cut at 3 sigma

# --------------------------------------------------------------------------------------------
# Canonical body profile (cavity = inside of the muscle wall), piecewise linear in z
# --------------------------------------------------------------------------------------------
_PROFILE_Z = np.array([-460, -300, -250, -180, -100, 0, 100, 200, 300, 380, 460], dtype=float)
_PROFILE_A = np.array([95, 122, 135, 135, 125, 125, 128, 132, 128, 112, 60], dtype=float)  # half width
_PROFILE_YC = np.array([10, 15, 15, 20, 20, 20, 15, 10, 10, 10, 15], dtype=float)  # centre (y)
_PROFILE_BA = np.array([70, 75, 80, 85, 90, 90, 92, 95, 92, 82, 45], dtype=float)  # anterior half depth
_PROFILE_BP = np.array([60, 65, 70, 75, 80, 80, 85, 85, 85, 76, 40], dtype=float)  # posterior half depth
# vertebral column: centre y, half width, half depth
_SPINE_Z = np.array([-275, -250, -180, -135, -60, 0, 150, 300, 460], dtype=float)
_SPINE_Y = np.array([-65, -62, -40, -12, 8, 0, -8, -5, 10], dtype=float)
_SPINE_RX = np.array([8, 14, 42, 38, 25, 23, 17, 16, 13], dtype=float)
_SPINE_RY = np.array([6, 9, 16, 18, 18, 17, 16, 15, 12], dtype=float)
_SPINE_TOP, _SPINE_BOTTOM, _SACRUM_TOP = 460.0, -275.0, -135.0
_VERTEBRA_PITCH = 30.0  # mm; L1 centred at z = 0
_LUNG_TOP = 392.0


def _profile(z):
    """Body cavity profile at canonical height(s) z: half width, centre y, anterior/posterior half depth."""
    return (
        np.interp(z, _PROFILE_Z, _PROFILE_A),
        np.interp(z, _PROFILE_Z, _PROFILE_YC),
        np.interp(z, _PROFILE_Z, _PROFILE_BA),
        np.interp(z, _PROFILE_Z, _PROFILE_BP),
    )


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def _axes(long_axis, hint):
    """Rotation whose rows are orthonormal local axes: e0 from ``hint`` orthogonalised, e2 = long."""
    e2 = np.asarray(long_axis, float)
    e2 = e2 / np.linalg.norm(e2)
    e0 = np.asarray(hint, float) - np.dot(hint, e2) * e2
    e0 = e0 / np.linalg.norm(e0)
    e1 = np.cross(e2, e0)
    return np.stack([e0, e1, e2])


def _ellipsoid(center, radii, rot=None):
    return {
        "kind": "ellipsoid",
        "c": np.asarray(center, float),
        "r": np.asarray(radii, float),
        "R": None if rot is None else np.asarray(rot, float),
    }


def _tube(points, radii, section=(1.0, 1.0)):
    return {"kind": "tube", "p": np.asarray(points, float), "r": np.asarray(radii, float), "section": np.asarray(section, float)}


def _part_bounds(part):
    """Axis-aligned bounds (lo, hi) of a part in its local frame."""
    if part["kind"] == "ellipsoid":
        r = part["r"]
        if part["R"] is None:
            ext = r
        else:
            ext = np.sqrt(((part["R"].T * r[None, :]) ** 2).sum(axis=1))
        return part["c"] - ext, part["c"] + ext
    rmax = part["r"].max() * max(1.0, float(part["section"].max()))
    return part["p"].min(axis=0) - rmax, part["p"].max(axis=0) + rmax


def _ellipsoid_phi(ux, uy, uz, part):
    c, r, R = part["c"], part["r"], part["R"]
    dx, dy, dz = ux - np.float32(c[0]), uy - np.float32(c[1]), uz - np.float32(c[2])
    if R is None:
        s = (dx / np.float32(r[0])) ** 2 + (dy / np.float32(r[1])) ** 2 + (dz / np.float32(r[2])) ** 2
    else:
        s = None
        for i in range(3):
            v = (dx * np.float32(R[i, 0]) + dy * np.float32(R[i, 1]) + dz * np.float32(R[i, 2])) / np.float32(r[i])
            s = v * v if s is None else s + v * v
    np.sqrt(s, out=s)
    s -= np.float32(1.0)
    s *= np.float32(r.min())
    return s


def _tube_phi(ux, uy, uz, part, zrange=None):
    """Signed pseudo-distance (mm) to a tube of linearly varying radius along a polyline."""
    p, r = part["p"], part["r"]
    sx, sy = part["section"]
    if sx != 1.0 or sy != 1.0:
        ux = ux / np.float32(sx)
        uy = uy / np.float32(sy)
        p = p / np.array([sx, sy, 1.0])
    phi = None
    for k in range(len(p) - 1):
        a, b = p[k], p[k + 1]
        ra, rb = float(r[k]), float(r[k + 1])
        if zrange is not None:
            lo = min(a[2], b[2]) - max(ra, rb)
            hi = max(a[2], b[2]) + max(ra, rb)
            if hi < zrange[0] or lo > zrange[1]:
                continue
        ab = b - a
        l2 = float(ab @ ab)
        ax, ay, az = (np.float32(v) for v in a)
        bx, by, bz = (np.float32(v) for v in ab)
        px, py, pz = ux - ax, uy - ay, uz - az
        t = (px * bx + py * by + pz * bz) / np.float32(l2)
        np.clip(t, 0.0, 1.0, out=t)
        px -= t * bx
        py -= t * by
        pz -= t * bz
        d = np.sqrt(px * px + py * py + pz * pz)
        d -= np.float32(ra) + t * np.float32(rb - ra)
        phi = d if phi is None else np.minimum(phi, d, out=phi)
    if phi is None:
        phi = np.full(np.broadcast_shapes(np.shape(ux), np.shape(uy), np.shape(uz)), 1e3, dtype=np.float32)
    return phi


def _part_phi(ux, uy, uz, part, zrange=None):
    if part["kind"] == "ellipsoid":
        return _ellipsoid_phi(ux, uy, uz, part)
    return _tube_phi(ux, uy, uz, part, zrange)


# --------------------------------------------------------------------------------------------
# Canonical anatomy
# --------------------------------------------------------------------------------------------


def _organ(
    name, label, material, parts, minus=(), *, jitter=(5.0, 0.08, 4.0), shape_amp=2.5, diaphragm=False, clip=True, thin=False
):
    return {
        "name": name,
        "label": label,
        "material": material,
        "parts": list(parts),
        "minus": list(minus),
        "jitter": jitter,  # (offset sd mm, scale half-range, rotation sd degrees)
        "shape_amp": shape_amp,
        "diaphragm": diaphragm,
        "clip": clip,
        "thin": thin,
    }


def _tube_pr(*points, section=(1.0, 1.0)):
    """A tube from (x, y, z, radius) points."""
    a = np.asarray(points, float)
    return _tube(a[:, :3], a[:, 3], section)


# fmt: off
def _canonical_organs() -> list[dict]:
    """The 13 labelled organs in canonical coordinates (mm), in painting order (later ones win).

    Ellipsoids: E(centre, radii, axes); tubes: T((x, y, z, radius), ...). Right is +x, anterior +y,
    superior +z; origin at the centre of the L1 vertebral body.
    """
    E, T, G = _ellipsoid, _tube_pr, _organ
    o = [
        G("liver", 1, "liver",
          [E((68, 15, 52), (64, 78, 74), _axes((0.15, 0, 1), (1, 0, 0))),  # right lobe
           E((-18, 55, 72), (58, 34, 30), _axes((0, 0.2, 1), (1, 0, 0.25))),  # left lobe
           E((14, 8, 62), (22, 20, 32))],  # caudate lobe
          [E((80, -5, -40), (70, 70, 45))],  # visceral surface over the right kidney and colon
          jitter=(6.0, 0.08, 4.0), shape_amp=3.5, diaphragm=True),
    ]
    spleen = _axes((0.2, 0.6, -0.75), (-0.8, -0.6, 0.0))
    o.append(G("spleen", 3, "spleen", [E((-95, -20, 70), (22, 38, 58), spleen)], [E((-62, 8, 70), (26, 30, 44), spleen)],
               jitter=(6.0, 0.12, 6.0), shape_amp=3.0, diaphragm=True))
    for name, label, side, cz in (("right kidney", 2, 1.0, -30.0), ("left kidney", 13, -1.0, -12.0)):
        ax = _axes((-0.25 * side, -0.2, 1.0), (-0.7 * side, 0.7, 0.0))  # upper pole medial, hilum anteromedial
        centre = np.array([62.0 * side, -30.0, cz])
        o.append(G(name, label, "kidney", [E(centre, (22, 30, 55), ax)], [E(centre + 26.0 * ax[0], (12, 14, 22), ax)],
                   jitter=(6.0, 0.1, 6.0), shape_amp=1.5))
    o += [
        G("esophagus", 10, "esophagus",
          [T((6, 20, 470, 8), (2, 16, 300, 8), (-4, 26, 200, 8), (-12, 32, 125, 8), (-25, 40, 97, 9), (-40, 40, 84, 10),
             (-52, 32, 80, 10), section=(1.15, 0.85))],
          jitter=(3.0, 0.08, 2.0), shape_amp=0.8, clip=False, thin=True),
        G("stomach", 11, "stomach",
          [T((-60, 15, 80, 32), (-66, 45, 48, 31), (-45, 78, 16, 26), (-8, 86, -8, 19), (18, 70, -10, 12))],
          jitter=(6.0, 0.12, 5.0), shape_amp=3.0, diaphragm=True),
        G("pancreas", 4, "pancreas",
          [T((35, 48, -48, 12), (30, 50, -22, 15), (8, 58, -8, 10), (-25, 55, 5, 11), (-60, 28, 18, 10), (-82, 0, 28, 9))],
          jitter=(4.0, 0.1, 4.0), shape_amp=2.5),
        G("duodenum", 12, "duodenum",
          [T((18, 70, -10, 11), (38, 58, -12, 13), (58, 40, -25, 12), (60, 34, -65, 12), (35, 48, -84, 12), (0, 58, -86, 11),
             (-25, 50, -76, 11), (-30, 46, -46, 11), (-35, 45, -28, 11))],
          jitter=(4.0, 0.1, 4.0), shape_amp=2.0),
        G("gallbladder", 9, "bile", [E((60, 62, 10), (14, 15, 32), _axes((0.15, 0.45, -0.88), (1, 0, 0)))],
          jitter=(5.0, 0.15, 8.0), shape_amp=1.5),
        G("right adrenal gland", 7, "adrenal", [T((32, -30, 24, 3), (38, -12, 56, 3.5), (55, -34, 30, 3))],
          jitter=(4.0, 0.1, 5.0), shape_amp=0.5, thin=True),
        G("left adrenal gland", 8, "adrenal", [T((-30, -18, 8, 3), (-34, -4, 44, 3.5), (-46, -26, 14, 3))],
          jitter=(4.0, 0.1, 5.0), shape_amp=0.5, thin=True),
        G("inferior vena cava", 6, "ivc",
          [T((18, 24, -112, 9), (24, 22, -40, 11), (25, 18, 20, 12), (20, 5, 80, 13), (10, 14, 122, 13), (6, 26, 140, 13),
             section=(1.2, 0.8))],
          jitter=(3.0, 0.08, 2.0), shape_amp=0.8, clip=False),
        G("aorta", 5, "aorta",
          [T((-14, 28, -95, 9), (-14, 28, -30, 10), (-16, 26, 30, 11), (-24, 14, 110, 12), (-29, 6, 230, 13), (-22, 14, 300, 14),
             (-5, 40, 332, 15), (10, 56, 312, 15), (8, 52, 250, 16))],
          jitter=(3.0, 0.08, 2.0), shape_amp=0.5, clip=False),
    ]
    return o


def _canonical_others() -> list[dict]:
    """Unlabelled structures painted by shape (label 0), before the organs."""
    E, T, G = _ellipsoid, _tube_pr, _organ
    o = []
    for s in (1.0, -1.0):
        o.append(G("psoas", 0, "muscle",
                   [T((30 * s, -5, 32, 6), (38 * s, -5, -30, 14), (45 * s, 0, -100, 20), (55 * s, 15, -160, 20), (65 * s, 35, -222, 16))],
                   jitter=(3.0, 0.1, 3.0), shape_amp=1.5, clip=False))
    o.append(G("colon", 0, "colon",
               [T((85, 28, -150, 28), (94, 14, -90, 26), (90, 42, -52, 24), (40, 86, -64, 22), (-20, 88, -58, 22), (-86, 38, -22, 22),
                  (-96, 4, -80, 20), (-92, 6, -150, 20), (-50, 40, -200, 18), (0, 22, -222, 17), (0, -42, -242, 18), (0, -46, -310, 15))],
               jitter=(6.0, 0.1, 4.0), shape_amp=4.0))
    o.append(G("bladder", 0, "bladder", [E((0, 52, -252), (44, 34, 32))], jitter=(5.0, 0.2, 5.0), shape_amp=2.0))
    o.append(G("heart", 0, "heart", [E((-12, 48, 175), (52, 46, 68), _axes((-0.5, 0.6, -0.3), (1, 0, 0)))],
               jitter=(6.0, 0.08, 5.0), shape_amp=2.0))
    o[-1]["above_diaphragm"] = True
    o.append(G("portal vein", 0, "vein", [T((-80, 8, 26, 4), (-40, 40, 8, 5), (5, 44, -6, 7), (25, 38, 20, 7), (45, 30, 40, 6))],
               jitter=(3.0, 0.05, 3.0), shape_amp=0.5))
    for s in (1.0, -1.0):
        o += [
            G("iliac artery", 0, "artery", [T((-14, 28, -95, 8), (-14 + 22 * s, 22, -140, 7), (-14 + 60 * s, 18, -200, 6), (-14 + 85 * s, 25, -245, 6))],
              jitter=(2.0, 0.05, 2.0), shape_amp=0.5, clip=False),
            G("iliac vein", 0, "ivc", [T((18, 24, -112, 9), (18 + 10 * s, 15, -150, 8), (8 + 55 * s, 12, -205, 8), (8 + 78 * s, 18, -250, 8))],
              jitter=(2.0, 0.05, 2.0), shape_amp=0.5, clip=False),
            G("femur", 0, "bone", [E((88 * s, 25, -255), (24, 24, 24)), T((88 * s, 25, -255, 15), (112 * s, 20, -290, 16), (118 * s, 20, -470, 14))],
              jitter=(3.0, 0.05, 2.0), shape_amp=0.5, clip=False),
            G("pubis and ischium", 0, "bone", [T((80 * s, 40, -262, 11), (14 * s, 74, -276, 9)), T((80 * s, 10, -266, 14), (62 * s, -8, -310, 12))],
              jitter=(3.0, 0.05, 2.0), shape_amp=0.5, clip=False),
        ]
    return o
# fmt: on


# Iliac wings: curved bony plates on a vertical elliptic cylinder (centre y, half axes by height).
_ILIUM_Z = np.array([-240.0, -205.0, -150.0, -92.0])
_ILIUM_AX = np.array([86.0, 96.0, 118.0, 126.0])
_ILIUM_BY = np.array([58.0, 62.0, 70.0, 74.0])
_ILIUM_YC = 8.0
