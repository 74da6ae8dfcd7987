"""Per-case random draws of the phantoms: scan range, spacing, orientation, organ poses, Hounsfield values."""

from __future__ import annotations

import numpy as np

from flare23.errors import Flare23Error
from flare23.tools.phantoms.anatomy import _M, ORIENTATIONS, PHASES, SCAN_RANGES, SIZES, _part_bounds, _profile

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
        "kidney_cortex": (cortex := u(180, 250) if art else u(150, 190), 6.0),
        # portal venous (early nephrographic) phase: the medulla has nearly caught up with the cortex
        "kidney_medulla": (u(90, 130) if art else cortex - u(0, 25), 6.0),
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
