"""Synthetic FLARE-like abdominal CT phantoms (``flare23 phantoms``).

Each case is a 3D body built from analytic shapes in a *canonical patient frame* (millimetres,
``x`` towards the patient's right, ``y`` anterior, ``z`` superior, i.e. RAS+; origin on the
midline at the centre of the L1 vertebral body): skin, subcutaneous fat, muscle wall, visceral
fat, lungs above a two-domed diaphragm, heart, spine (vertebral bodies, discs, canal, posterior
arch, processes, sacrum), ribs with costal cartilage, sternum, pelvis and femurs, psoas and
paraspinal muscles, small bowel, colon, bladder, the CT table, and the 13 FLARE organs
(liver right-upper, spleen left-upper, kidneys posterior with the adrenals on top, aorta
left-anterior of the spine with the IVC to its right, pancreas across the midline with its head
in the duodenal C-loop, stomach with gas and fluid, gallbladder under the liver, esophagus
entering the stomach).

Between cases the anatomy changes by a global body scale, fat and muscle thickness, per-organ
random poses (shift, scale, small rotation), a smooth random deformation and a smooth random
boundary perturbation. Hounsfield values follow a portal-venous or arterial contrast phase,
with low-frequency tissue texture, correlated noise and partial-volume blur (a Gaussian of
about half a voxel). Tumors (label 14, hypo- or hyper-dense, 5-60 mm) are placed inside the
liver, a kidney, the pancreas or the stomach, always one voxel (26-neighbourhood) away from the
host's boundary.

What FLARE varies, the generator varies: scan range (upper abdomen, abdomen, abdomen-pelvis,
chest-abdomen-pelvis), in-plane spacing (0.6-1.0 mm at full size), slice spacing (0.8-5 mm),
orientation (RAS, LPS, LAS) and array size. It also writes what FLARE gives for training: full
labels, partial labels (:data:`PARTIAL_PROPORTIONS`) and pseudo labels with realistic errors
(:data:`PSEUDO_ERROR_PROBS`, :data:`PSEUDO_MISSED_FRACTION`).

Speed: organ shapes are evaluated only inside their bounding boxes, slab by slab along z, and the
deformation is built from 2D fields (``d_x(y, z)``, ``d_y(x, z)``, ``d_z(x, y)``) so that no 3D
displacement field is stored (the body wall, lungs and bones use the undeformed frame, which is
separable). A 512 x 512 x 300 case takes about 15 s on one loaded CPU core, a tiny case about
0.1 s. The image pass works on z-slabs with a halo; noise is drawn per
slice from a seed of its own, so the result does not depend on the slab size. Output files are
byte-identical for a seed (nibabel writes gzip with mtime 0 and no file name), whatever the
number of worker processes.

Entry points: :func:`make_phantom` (one case in memory), :func:`generate_phantoms` (a data set
in the FLARE / nnU-Net layout with a MONAI datalist) and :func:`phantoms_cli` (the
``flare23 phantoms`` command).
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import cc3d
import nibabel as nib
import numpy as np
from scipy import ndimage

from flare23.constants import IMAGE_SUFFIX, LABEL_KEYS, ORGAN_IDS, PARTIAL_FIVE_ORGANS, TUMOR_ID
from flare23.errors import Flare23Error
from flare23.io import atomic_write_json, ensure_output_dir, save_nifti

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
#: Tumor diameter range in mm.
TUMOR_DIAMETER_MM = (5.0, 60.0)
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


# --------------------------------------------------------------------------------------------
# Random smooth fields
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Case sampling
# --------------------------------------------------------------------------------------------


def _choice(rng, probs: dict):
    keys = list(probs)
    p = np.array([probs[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _check_size(size) -> dict:
    if size not in SIZES:
        raise Flare23Error(f"size {size!r}: unknown, expected one of {', '.join(SIZES)}")
    return SIZES[size]


def _sample_case(seed: int, size: str, orientation=None, slices=None) -> dict:
    """Geometry and body parameters of one case (cheap; no arrays)."""
    spec = _check_size(size)
    if orientation is not None and orientation not in ORIENTATIONS:
        raise Flare23Error(f"orientation {orientation!r}: unknown, expected one of {', '.join(ORIENTATIONS)}")
    if slices is not None and (isinstance(slices, bool) or not isinstance(slices, (int, np.integer)) or slices < 2):
        raise Flare23Error(f"slices {slices!r}: expected an integer >= 2")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise Flare23Error(f"seed {seed!r}: expected an integer >= 0")
    rng = np.random.default_rng([int(seed), 1])
    c: dict = {"seed": int(seed), "size": size}
    c["orientation"] = orientation or _choice(rng, ORIENTATIONS)
    c["scan_range"] = _choice(rng, spec["ranges"])
    (b0, b1), (t0, t1) = SCAN_RANGES[c["scan_range"]]
    bottom, top = rng.uniform(b0, b1), rng.uniform(t0, t1)
    c["phase"] = _choice(rng, PHASES)
    matrix = spec["matrix"]

    s_xy = rng.uniform(*spec["body_scale"])
    scale = np.array([s_xy, s_xy * rng.uniform(0.94, 1.06), rng.uniform(0.92, 1.08)])
    fat_a = rng.uniform(*spec["fat_mm"])
    layers = {
        "muscle": rng.uniform(8.0, 14.0),
        "fat_anterior": fat_a,
        "fat_lateral": fat_a * rng.uniform(0.6, 1.0),
        "fat_posterior": 5.0 + fat_a * rng.uniform(0.3, 0.7),
        "skin": 2.0,
    }
    if size == "full":
        inplane = rng.uniform(*spec["inplane"])
        smax = (matrix * inplane / 2.0 - 12.0) / 150.0  # keep the organs (|x| < ~150 mm) in the field of view
        if scale[0] > smax:
            scale[:2] *= smax / scale[0]
    zs = np.linspace(bottom, top, 64)
    a, yc, ba, bp = _profile(zs)
    outer = layers["muscle"] + layers["skin"]
    half_w = float((a * scale[0]).max()) + outer + layers["fat_lateral"]
    front = float(((yc + ba) * scale[1]).max()) + outer + layers["fat_anterior"]
    back = float(((yc - bp) * scale[1]).min()) - outer - layers["fat_posterior"]
    need = max(2 * half_w, front - back)
    if size == "tiny":
        inplane = need * rng.uniform(1.06, 1.14) / matrix
    elif size == "small":
        inplane = max(rng.uniform(*spec["inplane"]), need * 1.03 / matrix)

    # slices
    zlen = (top - bottom) * scale[2]
    zmid = 0.5 * (top + bottom) * scale[2]
    lo_s, hi_s = spec["slice"]
    if size == "tiny":
        nz = int(slices) if slices is not None else spec["slices"]
        sz = float(np.clip(zlen / (nz - 1), lo_s, hi_s))
    elif size == "small":
        if slices is not None:
            nz = int(slices)
            sz = float(np.clip(zlen / (nz - 1), lo_s, hi_s))
        else:
            nz = int(np.clip(round(zlen / rng.uniform(lo_s, hi_s)) + 1, *spec["slices_range"]))
            sz = float(np.clip(zlen / (nz - 1), lo_s, hi_s))
    else:
        sz0 = float(_choice(rng, spec["slice_choices"]))
        if slices is not None:
            nz = int(slices)
            sz = float(np.clip(zlen / (nz - 1), lo_s, hi_s))
        else:
            sz = sz0
            nz = int(round(zlen / sz)) + 1
    zlen = sz * (nz - 1)

    # placement in the scanner frame: T is the world position of the canonical origin
    fov_c = np.array([rng.uniform(-25, 25), rng.uniform(-40, 40)])
    body_c = np.array([0.0, 0.5 * (front + back)])
    jitter = rng.uniform(-8, 8, size=2) if size != "full" else rng.uniform(-6, 6, size=2)
    t_xy = fov_c - body_c + jitter
    t_z = rng.uniform(-700.0, 100.0)
    origin = np.array(
        [
            fov_c[0] - (matrix - 1) / 2.0 * inplane,
            fov_c[1] - (matrix - 1) / 2.0 * inplane,
            t_z + zmid - zlen / 2.0,
        ]
    )
    c.update(
        shape_ras=(matrix, matrix, nz),
        spacing=(float(inplane), float(inplane), float(sz)),
        origin_ras=origin,
        translation=np.array([t_xy[0], t_xy[1], t_z]),
        scale=scale,
        layers=layers,
        canonical_z=(float((zmid - zlen / 2.0) / scale[2]), float((zmid + zlen / 2.0) / scale[2])),  # first, last slice
    )
    return c


def _split_tubes(parts: list[dict]) -> list[dict]:
    """Tubes become one part per segment, so that each is evaluated only inside its own box."""
    out = []
    for p in parts:
        if p["kind"] == "tube" and len(p["p"]) > 2:
            for k in range(len(p["p"]) - 1):
                out.append(dict(p, p=p["p"][k : k + 2], r=p["r"][k : k + 2]))
        else:
            out.append(p)
    return out


def _jitter_organs(rng, organs, case) -> list[dict]:
    """Per-case random pose of each structure: copies with the inverse affine ``u = M q + m``."""
    sp = np.array(case["spacing"]) / case["scale"]  # voxel size in canonical mm
    rmin = 0.55 * float(max(sp[0], sp[1]))
    dome = case["dome_shift"]
    out = []
    for org in organs:
        o = dict(org)
        off_sd, sc_half, rot_sd = o["jitter"]
        delta = rng.normal(0.0, off_sd, 3).clip(-2 * off_sd, 2 * off_sd)
        if o["diaphragm"]:
            delta[2] = 0.6 * delta[2] + (dome[0] if o["label"] == 1 else dome[1])
        s = 1.0 + rng.uniform(-sc_half, sc_half) + rng.uniform(-sc_half / 2, sc_half / 2, 3)
        ang = np.deg2rad(rng.normal(0.0, rot_sd, 3).clip(-2 * rot_sd, 2 * rot_sd))
        cx, cy, cz = np.cos(ang)
        sx_, sy_, sz_ = np.sin(ang)
        rx = np.array([[1, 0, 0], [0, cx, -sx_], [0, sx_, cx]])
        ry = np.array([[cy, 0, sy_], [0, 1, 0], [-sy_, 0, cy]])
        rz = np.array([[cz, -sz_, 0], [sz_, cz, 0], [0, 0, 1]])
        rot = rz @ ry @ rx
        if o["thin"]:
            o["parts"] = [dict(p, r=np.maximum(p["r"], rmin / float(s.min()))) if p["kind"] == "tube" else p for p in o["parts"]]
        lo = np.min([_part_bounds(p)[0] for p in o["parts"]], axis=0)
        hi = np.max([_part_bounds(p)[1] for p in o["parts"]], axis=0)
        center = 0.5 * (lo + hi)
        # forward: q = center + delta + rot @ (s * (u - center)); inverse: u = M q + m
        fwd = rot @ np.diag(s)
        inv = np.linalg.inv(fwd)
        o["M"] = inv.astype(np.float32)
        o["m"] = (center - inv @ (center + delta)).astype(np.float32)
        o["phi_scale"] = float(np.cbrt(np.prod(s)))
        margin = 3.0 * o["shape_amp"] + 2.0

        def qbox(plo, phi_, fwd=fwd, center=center, delta=delta, margin=margin):
            corners = np.array([[x, y, z] for x in (plo[0], phi_[0]) for y in (plo[1], phi_[1]) for z in (plo[2], phi_[2])])
            q = (center + delta) + (corners - center) @ fwd.T
            return q.min(axis=0) - margin, q.max(axis=0) + margin

        o["parts"] = [dict(p, qbox=qbox(*_part_bounds(p))) for p in _split_tubes(o["parts"])]
        o["minus"] = [dict(p, qbox=qbox(*_part_bounds(p))) for p in _split_tubes(o["minus"])]
        o["qbox"] = qbox(lo, hi)
        out.append(o)
    return out


def _sample_hu(rng, phase: str) -> tuple[np.ndarray, np.ndarray]:
    """HU and texture amplitude per material code (arrays of 256)."""
    hu = np.zeros(256, np.float32)
    tex = np.zeros(256, np.float32)
    u = rng.uniform
    art = phase == "arterial"
    table = {
        "air": (-1000.0, 0.0),
        "table": (u(-150, 50), 10.0),
        "skin": (u(20, 50), 5.0),
        "fat": (u(-110, -85), 6.0),
        "muscle": (u(40, 60), 5.0),
        "visceral_fat": (u(-105, -80), 10.0),
        "lung": (u(-880, -820), 25.0),
        "cancellous_bone": (u(260, 360), 35.0),
        "cortical_bone": (u(800, 1200), 60.0),
        "disc": (u(70, 100), 5.0),
        "csf": (u(5, 20), 3.0),
        "cartilage": (u(100, 160), 10.0),
        "myocardium": (u(80, 120), 5.0),
        "cardiac_blood": (u(220, 320) if art else u(150, 200), 8.0),
        "bowel_wall": (u(70, 110), 8.0),
        "bowel_fluid": (u(5, 30), 8.0),
        "stool": (u(-40, 30), 70.0),
        "gas": (-1000.0, 5.0),
        "urine": (u(0, 15), 3.0),
        "artery": (u(250, 380) if art else u(160, 220), 5.0),
        "liver": (u(60, 85) if art else u(95, 125), 6.0),
        "kidney_cortex": (u(180, 250) if art else u(150, 190), 6.0),
        "kidney_medulla": (u(90, 130) if art else u(130, 170), 6.0),
        "spleen": (u(110, 150) if art else u(105, 135), 10.0),
        "pancreas": (u(100, 140) if art else u(85, 115), 14.0),
        "aorta": (u(250, 380) if art else u(160, 220), 5.0),
        "ivc": (u(70, 110) if art else u(120, 170), 6.0),
        "adrenal": (u(45, 80), 5.0),
        "bile": (u(2, 22), 3.0),
        "esophagus": (u(35, 60), 5.0),
        "stomach_wall": (u(80, 115), 6.0),
        "gastric_fluid": (u(5, 30), 8.0),
        "duodenum_wall": (u(75, 110), 6.0),
        "duodenal_fluid": (u(5, 30), 6.0),
        "vein": (u(100, 150) if art else u(140, 190), 6.0),
    }
    table["artery"] = table["aorta"]  # iliac arteries carry the aortic contrast
    for name, (h, t) in table.items():
        hu[_M[name]] = h
        tex[_M[name]] = t
    return hu, tex


# --------------------------------------------------------------------------------------------
# The phantom
# --------------------------------------------------------------------------------------------


class _Builder:
    """Builds one case on its RAS grid; internal arrays are ordered (z, y, x)."""

    def __init__(self, case: dict):
        self.case = case
        rng = np.random.default_rng([case["seed"], 2])
        nx, ny, nz = case["shape_ras"]
        self.nx, self.ny, self.nz = nx, ny, nz
        sx, sy, sz = case["spacing"]
        ox, oy, oz = case["origin_ras"]
        self.xs = (ox + sx * np.arange(nx)).astype(np.float64)
        self.ys = (oy + sy * np.arange(ny)).astype(np.float64)
        self.zs = (oz + sz * np.arange(nz)).astype(np.float64)
        self.S = case["scale"]
        self.T = case["translation"]
        case["dome_shift"] = (rng.normal(0, 6), rng.normal(0, 6))
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
        # fields: tissue texture, organ boundary perturbation, bowel loops, bowel gas
        self.texture = _Field(rng, self.xs, self.ys, self.zs, sigma=rng.uniform(6.0, 10.0))
        self.shape = _Field(rng, self.xs, self.ys, self.zs, sigma=rng.uniform(16.0, 24.0))
        self.bowel = _Field(rng, self.xs, self.ys, self.zs, sigma=rng.uniform(9.0, 12.0))
        self.bubbles = _Field(rng, self.xs, self.ys, self.zs, sigma=6.0)
        self.hu, self.tex = _sample_hu(rng, case["phase"])
        self.stomach_gas = rng.uniform(52.0, 80.0)  # canonical y above which the stomach holds gas
        self.duodenum_gas = rng.uniform(50.0, 75.0)
        self.esophagus_air = bool(rng.random() < 0.4)
        self.bowel_gas = rng.uniform(0.75, 1.1)  # threshold on the bubble field
        self.organs = _jitter_organs(rng, _canonical_organs(), case)
        self.others = _jitter_organs(rng, _canonical_others(), case)
        self._argmin = {}

    # ---- index boxes -------------------------------------------------------------------------
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

    # ---- pass 1: anatomy ----------------------------------------------------------------------
    def anatomy(self):
        nz, ny, nx = self.nz, self.ny, self.nx
        self.material = np.zeros((nz, ny, nx), np.uint8)
        self.label = np.zeros((nz, ny, nx), np.uint8)
        for o in self.organs + self.others:
            o["box"] = self.index_box(*o["qbox"])
            for p in o["parts"] + o["minus"]:
                p["box"] = self.index_box(*p["qbox"])
        self._spine_box = self.index_box((-62.0, -140.0, _SPINE_BOTTOM), (62.0, 40.0, _SPINE_TOP))
        self._dome2d = self._dome(self.cx[None, :], self.cy[:, None])  # (y, x), undeformed
        step = max(1, _SLAB_VOXELS // (nx * ny))
        for k0 in range(0, nz, step):
            self._slab(k0, min(nz, k0 + step))
        self._keep_largest()
        self._ensure_present()

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

    def _slab(self, k0, k1):
        """Body, thorax, bowel, bones and then every shape, on slices k0:k1.

        The body wall, lungs, bowel region and bones use undeformed canonical coordinates (they are
        separable, hence cheap); the organs and other shapes use the deformed ones.
        """
        ks = slice(k0, k1)
        mat = self.material[ks]
        zc = self.cz[ks]
        a, yc, ba, bp = (np.asarray(v, np.float32) for v in _profile(zc))
        x, y = self.cx, self.cy
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
        wall = radial * np.float32(0.5 * (self.S[0] + self.S[1]))
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
        self._cavity_phi = wall
        sel = self._table2d_mask()[None] & (mat == _M["air"])
        mat[sel] = _M["table"]
        self._thorax(mat, zc, cavity)
        self._bowel(mat, k0, k1, zc, cavity)
        self._spine(mat, k0, k1, zc)
        self._pelvis(mat, zc)
        self._ribs(mat, zc, dy, radial)
        for o in self.others:
            self._paint(o, k0, k1, mat, None)
        for o in self.organs:
            self._paint(o, k0, k1, mat, self.label[ks])

    def _table2d_mask(self):
        if not hasattr(self, "_table2d"):
            lay = self.case["layers"]
            _, yc, _, bp = _profile(0.0)
            back = (yc - bp) * self.S[1] + self.T[1] - lay["muscle"] - lay["fat_posterior"] - lay["skin"] - 2.0
            xw = self.xs - self.T[0]
            top = back + 0.0006 * xw**2
            ty = self.ys[:, None]
            self._table2d = (ty <= top[None, :]) & (ty > top[None, :] - 7.0) & (np.abs(xw)[None, :] < 230.0)
        return self._table2d

    def _dome(self, qx, qy):
        """Diaphragm height (canonical z) over (qx, qy): right and left domes."""
        dr, dl = self.case["dome_shift"]
        out = None
        for x0, y0, peak in ((55.0, 10.0, 118.0 + dr), (-60.0, 0.0, 106.0 + dl)):
            ddx, ddy = qx - np.float32(x0), qy - np.float32(y0)
            h = (
                np.float32(peak)
                - np.float32(0.01) * ddx * ddx
                - np.where(ddy < 0, np.float32(0.015), np.float32(0.004)) * ddy * ddy
            )
            out = h if out is None else np.maximum(out, h)
        return np.maximum(out, np.float32(25.0)).astype(np.float32)

    def _thorax(self, mat, zc, cavity):
        if zc.max() < 20.0:
            return
        k = int(np.argmax(zc >= 20.0))
        mat, zc, cavity = mat[k:], zc[k:], cavity[k:]
        zz = zc[:, None, None]
        x, y = self.cx, self.cy
        ys = np.interp(zc, _SPINE_Z, _SPINE_Y).astype(np.float32)
        medi = (np.abs(x + np.float32(8.0)) < np.float32(30.0))[None, None, :] & (y[None, :] > ys[:, None] - np.float32(5.0))[
            :, :, None
        ]
        above = cavity & (zz > self._dome2d[None])
        mat[above] = _M["muscle"]  # diaphragm (kept where the lung does not reach)
        mat[above & medi] = _M["visceral_fat"]  # mediastinal fat
        mat[cavity & (zz > self._dome2d[None] + np.float32(4.0)) & (zz < _LUNG_TOP) & ~medi] = _M["lung"]
        mat[cavity & (zz >= _LUNG_TOP)] = _M["muscle"]
        st = (zc > 170.0) & (zc < 370.0)
        if st.any():
            _, yc, ba, _ = (np.asarray(v, np.float32) for v in _profile(zc))
            sy = (((y[None, :] - yc[:, None] - ba[:, None] - 6.0) / 7.0) ** 2)[:, :, None]
            sel = st[:, None, None] & (((x / 16.0) ** 2)[None, None, :] + sy < 1.0)
            mat[sel] = _M["cancellous_bone"]

    def _bowel(self, mat, k0, k1, zc, cavity):
        zmask = (zc > -235.0) & (zc < -25.0)
        if not zmask.any():
            return
        kk = np.nonzero(zmask)[0]
        ka, kb = int(kk[0]), int(kk[-1]) + 1
        x, y = self.cx, self.cy
        zz = zc[ka:kb][:, None, None]
        region = cavity[ka:kb] & ((y > -15.0)[None, :, None] & (np.abs(x) < 110.0)[None, None, :])
        region &= ~((zz < -200.0) & (y < 10.0)[None, :, None])
        ks = slice(k0 + ka, k0 + kb)
        af = np.abs(self.bowel(ks, slice(0, self.ny), slice(0, self.nx)))
        lumen = region & (af < 0.32)
        m = mat[ka:kb]
        m[region & (af >= 0.32) & (af < 0.45)] = _M["bowel_wall"]
        m[lumen] = _M["bowel_fluid"]
        m[lumen & (self.bubbles(ks, slice(0, self.ny), slice(0, self.nx)) > self.bowel_gas)] = _M["gas"]

    def _spine(self, mat, k0, k1, zc):
        """Vertebrae, discs, canal, posterior arch, processes, sacrum and paraspinal muscles."""
        (b0, b1), (j0, j1), (i0, i1) = self._spine_box
        ka, kb = max(k0, b0), min(k1, b1)
        if ka >= kb or j0 >= j1 or i0 >= i1:
            return
        js, is_ = slice(j0, j1), slice(i0, i1)
        m = mat[ka - k0 : kb - k0, js, is_]
        zc = zc[ka - k0 : kb - k0]
        qx = self.cx[is_][None, None, :]
        ys = np.interp(zc, _SPINE_Z, _SPINE_Y).astype(np.float32)
        dqy = (self.cy[js][None, :] - ys[:, None])[:, :, None]
        zz = zc[:, None, None]
        for s in (1.0, -1.0):
            sel = ((qx - np.float32(36.0 * s)) / 25.0) ** 2 + ((dqy + 50.0) / 21.0) ** 2 < 1.0
            m[sel & ((zz > -200.0) & (zz < 440.0))] = _M["muscle"]
        valid = ((zc > _SPINE_BOTTOM) & (zc < _SPINE_TOP))[:, None, None]
        rx = np.interp(zc, _SPINE_Z, _SPINE_RX).astype(np.float32)[:, None, None]
        ry = np.interp(zc, _SPINE_Z, _SPINE_RY).astype(np.float32)[:, None, None]
        # vertebral phase: distance (mm) to the nearest vertebra centre; discs half way between
        ph = zz - _VERTEBRA_PITCH * np.round(zz / _VERTEBRA_PITCH)
        mobile = (zz > _SACRUM_TOP) & valid
        r = np.sqrt((qx / rx) ** 2 + (dqy / ry) ** 2)
        body = (r < 1.0) & valid
        m[body] = _M["cancellous_bone"]
        m[body & (r > 1.0 - 2.5 / np.minimum(rx, ry))] = _M["cortical_bone"]
        m[body & mobile & (np.abs(np.abs(ph) - _VERTEBRA_PITCH / 2) < 4.0)] = _M["disc"]
        # posterior arch around the canal
        cy = dqy + ry + 11.0
        arch = ((qx / 17.0) ** 2 + (cy / 14.0) ** 2 < 1.0) & valid & (zz > _SACRUM_TOP - 80)
        m[arch] = _M["cortical_bone"]
        m[arch & ((qx / 9.0) ** 2 + (cy / 9.0) ** 2 < 1.0)] = _M["csf"]
        spinous = (qx / 5.0) ** 2 + ((dqy + ry + 34.0) / 16.0) ** 2 < 1.0
        m[spinous & (np.abs(ph) < 9.0) & mobile] = _M["cortical_bone"]
        lumbar = (zz > -130.0) & (zz < 15.0)
        transverse = ((np.abs(qx) - 34.0) / 16.0) ** 2 + ((dqy + ry + 6.0) / 6.0) ** 2 < 1.0
        m[transverse & (np.abs(ph) < 6.0) & lumbar] = _M["cortical_bone"]

    def _pelvis(self, mat, zc):
        """Iliac wings: 4 mm plates from the sacroiliac joints sweeping laterally and forwards."""
        sel = (zc > _ILIUM_Z[0]) & (zc < _ILIUM_Z[-1])
        if not sel.any():
            return
        kk = np.nonzero(sel)[0]
        ka, kb = int(kk[0]), int(kk[-1]) + 1
        z = zc[ka:kb]
        ax = np.interp(z, _ILIUM_Z, _ILIUM_AX).astype(np.float32)[:, None, None]
        by = np.interp(z, _ILIUM_Z, _ILIUM_BY).astype(np.float32)[:, None, None]
        x = self.cx[None, None, :]
        y = (self.cy - np.float32(_ILIUM_YC))[None, :, None]
        rho = np.sqrt((x / ax) ** 2 + (y / by) ** 2)
        plate = np.abs(rho - 1.0) * np.minimum(ax, by) < 2.0
        plate &= (np.abs(x) > 42.0) & (y > -40.0 - _ILIUM_YC) & (y < 40.0 - _ILIUM_YC)
        mat[ka:kb][plate] = _M["cortical_bone"]

    def _ribs(self, mat, zc, dy, radial):
        if zc.max() < -40.0 or zc.min() > 400.0:
            return
        near = np.abs(radial - 6.0) < 6.0
        idx = np.nonzero(near)
        if not len(idx[0]):
            return
        px, py = self.cx[idx[2]], dy[idx[0], idx[1]]
        zz = zc[idx[0]]
        rad = radial[idx]
        theta = np.arctan2(np.abs(px), -py) / np.float32(np.pi)  # 0 posterior, 1 anterior
        s = zz + np.float32(130.0) * theta ** np.float32(1.1)
        kr = np.round(13.0 - (s - 5.0) / _VERTEBRA_PITCH)
        dz = (s - 5.0) - _VERTEBRA_PITCH * (13.0 - kr)
        tmax = np.select([kr <= 7, kr <= 10, kr <= 11], [0.97, 0.85, 0.6], 0.45)
        rib = ((dz / 5.0) ** 2 + ((rad - 6.0) / 4.5) ** 2 < 1.0) & (kr >= 1) & (kr <= 12) & (theta <= tmax)
        cart = rib & (theta > 0.72)
        mat[tuple(i[rib & ~cart] for i in idx)] = _M["cortical_bone"]
        mat[tuple(i[cart] for i in idx)] = _M["cartilage"]

    def _paint(self, o, k0, k1, mat, lab):
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
            return sl, self.u(o, slice(c0, c1), slice(d0, d1), slice(e0, e1))

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
            np.maximum(phi, self._cavity_phi[ka - k0 : kb - k0, js, is_] + np.float32(1.0), out=phi)
        if o["diaphragm"] and self.cz[kb - 1] + self.dmax / self.S[2] > 20.0:
            qz = self.cz[ks][:, None, None] + self.dZs[js, is_][None]
            np.maximum(phi, qz - (self._dome2d[js, is_][None] - np.float32(4.0)), out=phi)
        if o.get("above_diaphragm"):
            qz = self.cz[ks][:, None, None] + self.dZs[js, is_][None]
            np.maximum(phi, (self._dome2d[js, is_][None] + np.float32(4.0)) - qz, out=phi)
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
            qy = np.broadcast_to(self.cy[js][None, :, None] + self.dYs[ks, is_][:, None, :], shape)
        sub = mat[ka - k0 : kb - k0, js, is_]
        sub[inside] = self._materials(o, phi, inside, qy, ks, js, is_)
        if lab is not None and o["label"]:
            lab[ka - k0 : kb - k0, js, is_][inside] = o["label"]

    def _materials(self, o, phi, inside, qy, ks, js, is_):
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

    def _ensure_present(self):
        """An organ that no voxel centre fell into (thin organs at coarse spacing) gets its deepest voxel."""
        objs = ndimage.find_objects(self.label, max_label=TUMOR_ID)
        for key, (_, idx, material) in sorted(self._argmin.items()):
            if objs[key - 1] is None:
                self.label[idx] = key
                self.material[idx] = _M["kidney_cortex"] if material == "kidney" else _M.get(material, _M["stomach_wall"])

    # ---- pass 2: tumors ------------------------------------------------------------------------
    def tumors(self, want: bool) -> list[dict]:
        rng = np.random.default_rng([self.case["seed"], 3])
        self.organs_map = self.label.copy()
        if not want:
            return []
        n = int(_choice(rng, TUMOR_COUNT_PROBS))
        sp = np.array([self.case["spacing"][2], self.case["spacing"][1], self.case["spacing"][0]])  # (z, y, x)
        host_ids = list(TUMOR_HOSTS)
        objs = ndimage.find_objects(self.organs_map, max_label=14)
        cube = np.ones((3, 3, 3), bool)
        out = []
        for _ in range(n):
            order = list(rng.permutation(len(host_ids)))
            first = _choice(rng, TUMOR_HOSTS)
            order = [host_ids.index(first)] + [i for i in order if host_ids[i] != first]
            for hi in order:
                host = host_ids[hi]
                box = objs[host - 1]
                if box is None:
                    continue
                box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in box)
                hmask = self.organs_map[box] == host
                core = ndimage.binary_erosion(hmask, structure=cube)
                core &= self.label[box] == host  # not inside an earlier tumor
                if not core.any():
                    continue
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
                # evaluate the ellipsoid on its own box only
                ext = np.ceil(1.4 * radii.max() / sp).astype(int) + 1
                tb = tuple(slice(max(0, int(c[a] - ext[a])), min(hmask.shape[a], int(c[a] + ext[a] + 1))) for a in range(3))
                g = np.ogrid[tb[0], tb[1], tb[2]]
                dz, dy, dx = ((g[a] - c[a]).astype(np.float32) * np.float32(sp[a]) for a in range(3))
                s = None
                for i in range(3):  # rot rows are local axes in (x, y, z) world order
                    v = (dx * rot[i, 0] + dy * rot[i, 1] + dz * rot[i, 2]) / np.float32(radii[i])
                    s = v * v if s is None else s + v * v
                if r > 8:
                    wob = 1.0 + 0.12 * self.shape(
                        *(slice(box[a].start + tb[a].start, box[a].start + tb[a].stop) for a in range(3))
                    )
                    s = s / (wob * wob)
                tumor = np.zeros(hmask.shape, bool)
                tumor[tb] = (s <= 1.0) & core[tb]
                tumor[tuple(c)] = True
                cz, cy, cx = (int(v) for v in c)
                kind = "hypo" if rng.random() < 0.7 else "hyper"
                delta = float(rng.uniform(20.0, 60.0)) * (-1.0 if kind == "hypo" else 1.0)
                host_mat = {1: "liver", 2: "kidney_cortex", 13: "kidney_cortex", 4: "pancreas", 11: "stomach_wall"}[host]
                code = TUMOR_MATERIAL_BASE + len(out)
                self.hu[code] = self.hu[_M[host_mat]] + delta
                self.tex[code] = 8.0
                self.label[box][tumor] = TUMOR_ID
                self.material[box][tumor] = code
                zyx = np.array([box[0].start + cz, box[1].start + cy, box[2].start + cx])
                out.append(
                    {
                        "host": int(host),
                        "host_name": LABEL_KEYS[host],
                        "kind": kind,
                        "hu_delta": round(delta, 1),
                        "diameter_mm": round(diam, 2),
                        "center_mm": [round(float(v), 3) for v in self._world(zyx)],
                        "voxels": int(tumor.sum()),
                    }
                )
                break
        return out

    def _world(self, zyx) -> np.ndarray:
        """World RAS+ mm of an internal (z, y, x) voxel index."""
        return np.array([self.xs[zyx[2]], self.ys[zyx[1]], self.zs[zyx[0]]])

    # ---- pass 3: image -------------------------------------------------------------------------
    def image(self, noise_std: float, pad_value: int | None) -> np.ndarray:
        nz, ny, nx = self.nz, self.ny, self.nx
        sp = self.case["spacing"]
        # partial volume (about a voxel-wide box, sigma 0.5 voxel) combined with a 0.55 mm in-plane PSF
        sig = (0.5, float(np.hypot(0.5, 0.55 / sp[1])), float(np.hypot(0.5, 0.55 / sp[0])))  # (z, y, x) voxels
        # std of blurred white noise, to scale the noise to ``noise_std`` after blurring
        gain = 1.0
        for s in sig:
            delta = np.zeros(41)
            delta[20] = 1.0
            gain *= float(np.sqrt((ndimage.gaussian_filter1d(delta, s, mode="constant", truncate=_TRUNCATE) ** 2).sum()))
        white = np.float32(noise_std / gain)
        halo = int(_TRUNCATE * sig[0] + 0.5)  # scipy's kernel radius
        out = np.empty((nz, ny, nx), np.int16)
        circle = None
        if pad_value is not None:
            yy, xx = np.meshgrid(np.arange(ny) - (ny - 1) / 2, np.arange(nx) - (nx - 1) / 2, indexing="ij")
            circle = (yy**2 + xx**2) > (min(nx, ny) / 2.0) ** 2
        step = max(1, _IMAGE_SLAB_VOXELS // (nx * ny))
        for k0 in range(0, nz, step):
            k1 = min(nz, k0 + step)
            a0, a1 = max(0, k0 - halo), min(nz, k1 + halo)
            mat = self.material[a0:a1]
            img = self.hu[mat]
            img += self.tex[mat] * self.texture(slice(a0, a1), slice(0, ny), slice(0, nx))
            for k in range(a0, a1):
                g = np.random.default_rng([self.case["seed"], 4, k])
                img[k - a0] += g.standard_normal((ny, nx), dtype=np.float32) * white
            img = ndimage.gaussian_filter(img, sig, mode="nearest", truncate=_TRUNCATE)
            img = img[k0 - a0 : k1 - a0]
            np.clip(np.rint(img), *_HU_CLIP, out=img)
            res = img.astype(np.int16)
            if circle is not None:
                res[:, circle] = pad_value
            out[k0:k1] = res
        return out


def _pseudo(organs_map: np.ndarray, rng, miss: int | None) -> tuple[np.ndarray, dict]:
    """Pseudo labels: 13 organs with one-voxel in-plane erosions / dilations, maybe one missed organ."""
    pseudo = organs_map.copy()
    errors = {}
    cross = np.zeros((1, 3, 3), bool)
    cross[0, 1, :] = cross[0, :, 1] = True
    objs = ndimage.find_objects(organs_map, max_label=14)
    for lab in ORGAN_IDS:
        kind = _choice(rng, PSEUDO_ERROR_PROBS)
        box = objs[lab - 1]
        if lab == miss or box is None:
            errors[LABEL_KEYS[lab]] = "missed" if lab == miss else "none"
            continue
        box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in box)
        org = organs_map[box] == lab
        if kind == "erode":
            er = ndimage.binary_erosion(org, structure=cross)
            if not er.any():
                kind = "none"
            else:
                sub = pseudo[box]
                sub[org & ~er & (sub == lab)] = 0
        elif kind == "dilate":
            di = ndimage.binary_dilation(org, structure=cross)
            sub = pseudo[box]
            grow = di & ~org & (sub == 0)
            if not grow.any():
                kind = "none"
            sub[grow] = lab
        errors[LABEL_KEYS[lab]] = kind
    if miss is not None:
        pseudo[pseudo == miss] = 0
    return pseudo, errors


def _label_counts(label: np.ndarray) -> list[int]:
    """Voxel count of labels 1..14 (counted inside each label's bounding box)."""
    objs = ndimage.find_objects(label, max_label=TUMOR_ID)
    return [0 if box is None else int(np.count_nonzero(label[box] == i + 1)) for i, box in enumerate(objs)]


def _reorient(arr_zyx: np.ndarray, code: str) -> np.ndarray:
    """(z, y, x) RAS array -> (x, y, z) array in orientation ``code``."""
    xyz = arr_zyx.T
    tr = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(tuple(code)))
    return nib.orientations.apply_orientation(xyz, tr)


def _affine(case: dict) -> np.ndarray:
    ras = np.diag(list(case["spacing"]) + [1.0])
    ras[:3, 3] = case["origin_ras"]
    tr = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(tuple(case["orientation"]))
    )
    return ras @ nib.orientations.inv_ornt_aff(tr, case["shape_ras"])


def make_phantom(seed, size="tiny", tumor=None, orientation=None, slices=None, *, partial_kind=None, pseudo_miss=None) -> dict:
    """One synthetic case in memory.

    ``tumor``: True (at least one tumor), False (none) or None (random, probability
    :data:`TUMOR_FRACTION`). ``orientation``: "RAS", "LPS", "LAS" or None (random).
    ``slices``: number of slices (the slice spacing follows, within the size's range).
    ``partial_kind``: "all", "five", "tumor" or None (random, :data:`PARTIAL_PROPORTIONS`; a
    "tumor" partial label of a case without tumor is empty).
    ``pseudo_miss``: True / False / None (random, :data:`PSEUDO_MISSED_FRACTION`) whether the
    pseudo label misses one small organ.

    Returns a dict: ``image`` (int16 HU), ``label`` (uint8 full labels), ``partial``, ``pseudo``,
    ``organs`` (the clean organ map before tumors were painted), ``tissue`` (uint8 material codes,
    :data:`MATERIALS`), ``affine`` (4 x 4, world RAS+ mm) and ``meta``. Arrays are (x, y, z) in
    the orientation ``meta["orientation"]``.
    """
    case = _sample_case(seed, size, orientation, slices)
    rng = np.random.default_rng([int(seed), 5])
    if tumor is None:
        tumor = bool(rng.random() < TUMOR_FRACTION)
    if partial_kind is None:
        partial_kind = _choice(rng, PARTIAL_PROPORTIONS)
    elif partial_kind not in PARTIAL_PROPORTIONS:
        raise Flare23Error(f"partial_kind {partial_kind!r}: expected one of {', '.join(PARTIAL_PROPORTIONS)}")
    if pseudo_miss is None:
        pseudo_miss = bool(rng.random() < PSEUDO_MISSED_FRACTION)
    miss = int(rng.choice(PSEUDO_SMALL_ORGANS)) if pseudo_miss else None
    noise_std = float(np.clip(rng.uniform(8.0, 20.0) * math.sqrt(2.5 / case["spacing"][2]), 5.0, 40.0))
    pad_value = None
    if size == "full":
        pad_value = int(_choice(rng, {-1024: 0.6, -2048: 0.2, -3024: 0.2}))

    b = _Builder(case)
    b.anatomy()
    tumors = b.tumors(bool(tumor))
    image = b.image(noise_std, pad_value)
    label = b.label
    keep = np.zeros(256, bool)
    keep[list(PARTIAL_KEEP[partial_kind])] = True
    partial = np.where(keep[label], label, 0).astype(np.uint8)
    pseudo, errors = _pseudo(b.organs_map, np.random.default_rng([int(seed), 6]), miss)

    code = case["orientation"]
    affine = _affine(case)
    inv = np.linalg.inv(affine)
    for t in tumors:  # voxel index of the centre in the returned / written arrays
        t["center_voxel"] = [int(round(v)) for v in nib.affines.apply_affine(inv, t["center_mm"])]
    counts = _label_counts(label)
    meta = {
        "seed": int(seed),
        "size": size,
        "shape": [int(v) for v in _reorient(label, code).shape],
        "spacing": [float(v) for v in case["spacing"]],
        "orientation": code,
        "affine": affine.round(6).tolist(),
        "scan_range": case["scan_range"],
        "canonical_z_mm": [round(v, 2) for v in case["canonical_z"]],
        "phase": case["phase"],
        "body_scale": [round(float(v), 4) for v in case["scale"]],
        "fat_mm": round(case["layers"]["fat_anterior"], 2),
        "noise_std": round(noise_std, 2),
        "pad_value": pad_value,
        "tumors": tumors,
        "partial_kind": partial_kind,
        "pseudo_errors": errors,
        "pseudo_missed": LABEL_KEYS[miss] if miss is not None else None,
        "label_voxels": {LABEL_KEYS[i]: counts[i - 1] for i in range(1, TUMOR_ID + 1)},
        "hu": {name: round(float(b.hu[c]), 1) for name, c in _M.items()},
    }
    return {
        "image": _reorient(image, code),
        "label": _reorient(label, code),
        "partial": _reorient(partial, code),
        "pseudo": _reorient(pseudo, code),
        "organs": _reorient(b.organs_map, code),
        "tissue": _reorient(b.material, code),
        "affine": affine,
        "meta": meta,
    }


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a data set generated with ``seed`` (independent of the case count)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0])


def _counts(n: int, probs: dict) -> dict:
    """Largest-remainder split of n items by probabilities."""
    keys = list(probs)
    raw = np.array([probs[k] for k in keys], float) * n / sum(probs.values())
    base = np.floor(raw).astype(int)
    order = np.argsort(-(raw - base), kind="stable")
    for i in order[: n - base.sum()]:
        base[i] += 1
    return dict(zip(keys, base.tolist()))


def _plan(cases: int, seed: int, tumor_fraction: float, validation_fraction: float) -> list[dict]:
    """Per-case settings with exact proportions (tumor, partial kind, pseudo miss, split)."""
    rng = np.random.default_rng([int(seed), 99])
    tumor = np.zeros(cases, bool)
    tumor[rng.permutation(cases)[: int(round(tumor_fraction * cases))]] = True
    # partial kinds in exact proportions; "tumor only" annotations go to cases with tumors first
    counts = _counts(cases, PARTIAL_PROPORTIONS)
    perm = rng.permutation(cases)
    order = [int(i) for i in perm if tumor[i]] + [int(i) for i in perm if not tumor[i]]
    n_tumor_kind = counts.pop("tumor", 0)
    rest = [k for k, n in counts.items() for _ in range(n)]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    kinds = [""] * cases
    for j, i in enumerate(order):
        kinds[i] = "tumor" if j < n_tumor_kind else rest[j - n_tumor_kind]
    miss = np.zeros(cases, bool)
    miss[rng.permutation(cases)[: int(round(PSEUDO_MISSED_FRACTION * cases))]] = True
    n_val = int(round(validation_fraction * cases))
    if cases >= 2 and validation_fraction > 0:
        n_val = min(max(n_val, 1), cases - 1)
    elif cases < 2:
        n_val = 0
    val = np.zeros(cases, bool)
    val[rng.permutation(cases)[:n_val]] = True
    return [
        {
            "index": i,
            "name": f"phantom_{i:04d}",
            "seed": case_seed(seed, i),
            "tumor": bool(tumor[i]),
            "partial_kind": kinds[i],
            "pseudo_miss": bool(miss[i]),
            "validation": bool(val[i]),
        }
        for i in range(cases)
    ]


def _header() -> nib.Nifti1Header:
    h = nib.Nifti1Header()
    h.set_xyzt_units("mm", "sec")
    return h


def _write_case(out_dir: str, item: dict, size: str, slices) -> dict:
    out = Path(out_dir)
    ph = make_phantom(
        item["seed"],
        size=size,
        tumor=item["tumor"],
        slices=slices,
        partial_kind=item["partial_kind"],
        pseudo_miss=item["pseudo_miss"],
    )
    name, aff, hdr = item["name"], ph["affine"], _header()
    save_nifti(ph["image"], aff, out / "imagesTr" / f"{name}{IMAGE_SUFFIX}.nii.gz", header=hdr, dtype=np.int16)
    save_nifti(ph["label"], aff, out / "labelsTr" / f"{name}.nii.gz", header=hdr, dtype=np.uint8)
    save_nifti(ph["partial"], aff, out / "partial" / f"{name}.nii.gz", header=hdr, dtype=np.uint8)
    save_nifti(ph["pseudo"], aff, out / "pseudo" / f"{name}.nii.gz", header=hdr, dtype=np.uint8)
    meta = dict(ph["meta"])
    meta["name"] = name
    meta["validation"] = item["validation"]
    return meta


def _check_fraction(name, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise Flare23Error(f"{name} {value!r}: expected a number between 0 and 1") from None
    if not 0.0 <= v <= 1.0:
        raise Flare23Error(f"{name} {value!r}: expected a number between 0 and 1")
    return v


def _check_int(name, value, low) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
        raise Flare23Error(f"{name} {value!r}: expected an integer >= {low}")
    return int(value)


def generate_phantoms(
    out_dir,
    cases=10,
    seed=0,
    size="small",
    tumor_fraction=TUMOR_FRACTION,
    validation_fraction=0.2,
    slices=None,
    workers=1,
    progress=False,
) -> Path:
    """Write a phantom data set in the FLARE / nnU-Net layout and return ``out_dir``.

    Files: ``imagesTr/<case>_0000.nii.gz`` (int16 HU), ``labelsTr/<case>.nii.gz`` (full labels),
    ``partial/<case>.nii.gz``, ``pseudo/<case>.nii.gz`` (uint8), ``datalist.json`` (MONAI datalist
    with ``training`` and ``validation`` lists, paths relative to ``out_dir``) and
    ``phantoms.json`` (settings and every case's ``meta``). Case ``i`` is named
    ``phantom_{i:04d}``; its anatomy depends only on ``(seed, i)``, while tumor presence, partial
    kind, pseudo-label miss and the validation split are assigned so that their proportions are
    exact for the data set (tumor-only partial labels go to cases with tumors first). ``workers``
    > 1 generates cases in parallel processes with identical output bytes.
    """
    cases = _check_int("cases", cases, 1)
    seed = _check_int("seed", seed, 0)
    workers = _check_int("workers", workers, 1)
    _check_size(size)
    tumor_fraction = _check_fraction("tumor_fraction", tumor_fraction)
    validation_fraction = _check_fraction("validation_fraction", validation_fraction)
    if slices is not None:
        slices = _check_int("slices", slices, 2)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise Flare23Error(f"{out}: exists and is not a folder")
    ensure_output_dir(out)
    for sub in ("imagesTr", "labelsTr", "partial", "pseudo"):
        ensure_output_dir(out / sub)
    plan = _plan(cases, seed, tumor_fraction, validation_fraction)

    from tqdm import tqdm

    metas: list[dict | None] = [None] * cases
    bar = tqdm(total=cases, desc="phantoms", unit="case", disable=not progress)
    try:
        if workers == 1 or cases == 1:
            for item in plan:
                metas[item["index"]] = _write_case(str(out), item, size, slices)
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(workers, cases), mp_context=ctx) as pool:
                futures = {pool.submit(_write_case, str(out), item, size, slices): item["index"] for item in plan}
                for fut in as_completed(futures):
                    metas[futures[fut]] = fut.result()
                    bar.update(1)
    finally:
        bar.close()

    def entry(m):
        return {"image": f"imagesTr/{m['name']}{IMAGE_SUFFIX}.nii.gz", "label": f"labelsTr/{m['name']}.nii.gz"}

    datalist = {
        "training": [entry(m) for m in metas if not m["validation"]],
        "validation": [entry(m) for m in metas if m["validation"]],
    }
    atomic_write_json(out / "datalist.json", datalist)
    settings = {
        "cases": cases,
        "seed": seed,
        "size": size,
        "tumor_fraction": tumor_fraction,
        "validation_fraction": validation_fraction,
        "slices": slices,
        "labels": {str(i): k for i, k in LABEL_KEYS.items()},
        "partial_proportions": PARTIAL_PROPORTIONS,
        "pseudo_error_probs": PSEUDO_ERROR_PROBS,
        "pseudo_missed_fraction": PSEUDO_MISSED_FRACTION,
        "materials": MATERIALS,
    }
    atomic_write_json(out / "phantoms.json", {"settings": settings, "cases": metas})
    return out


def phantoms_cli(
    out_dir, cases=10, seed=0, size="small", tumor_fraction=TUMOR_FRACTION, validation_fraction=0.2, slices=None, workers=1
):
    """Generate synthetic FLARE-like CT phantoms into OUT_DIR (imagesTr, labelsTr, partial, pseudo, datalist.json).

    Sizes: tiny (64 x 64 x 32, for tests), small (128 x 128 x 40-80, for CPU training), full
    (512 x 512 x N at 0.6-1.0 mm in-plane, 0.8-5 mm slices; ``--slices`` fixes N).
    """
    out = generate_phantoms(out_dir, cases, seed, size, tumor_fraction, validation_fraction, slices, workers, progress=True)
    print(f"wrote {cases} {size} phantom case(s) to {out}: imagesTr/, labelsTr/, partial/, pseudo/")
    print(f"datalist: {out / 'datalist.json'}; case details: {out / 'phantoms.json'}")
    return None


__all__ = [
    "MATERIALS",
    "PARTIAL_PROPORTIONS",
    "PSEUDO_ERROR_PROBS",
    "PSEUDO_MISSED_FRACTION",
    "SIZES",
    "case_seed",
    "generate_phantoms",
    "make_phantom",
    "phantoms_cli",
]
