"""The phantoms' bones on one slab of the anatomy pass: spine (with paraspinal muscles), iliac wings and ribs.

They use the undeformed canonical coordinates (``cx``, ``cy``, ``zc`` of :class:`~flare23.tools.phantoms.grid._Grid`),
which are separable and hence cheap, and write material codes into the slab's material array.
"""

from __future__ import annotations

import numpy as np

from flare23.tools.phantoms.anatomy import (
    _ILIUM_AX,
    _ILIUM_BY,
    _ILIUM_YC,
    _ILIUM_Z,
    _M,
    _SACRUM_TOP,
    _SPINE_BOTTOM,
    _SPINE_RX,
    _SPINE_RY,
    _SPINE_TOP,
    _SPINE_Y,
    _SPINE_Z,
    _VERTEBRA_PITCH,
)


def _spine_box(grid):
    """Index box (z, y, x) of the spine and the paraspinal muscles."""
    return grid.index_box((-62.0, -140.0, _SPINE_BOTTOM), (62.0, 40.0, _SPINE_TOP))


def _paint_spine(mat, k0, k1, zc, box, cx, cy):
    """Vertebrae, discs, canal, posterior arch, processes, sacrum and paraspinal muscles."""
    (b0, b1), (j0, j1), (i0, i1) = box
    ka, kb = max(k0, b0), min(k1, b1)
    if ka >= kb or j0 >= j1 or i0 >= i1:
        return
    js, is_ = slice(j0, j1), slice(i0, i1)
    m = mat[ka - k0 : kb - k0, js, is_]
    zc = zc[ka - k0 : kb - k0]
    qx = cx[is_][None, None, :]
    ys = np.interp(zc, _SPINE_Z, _SPINE_Y).astype(np.float32)
    dqy = (cy[js][None, :] - ys[:, None])[:, :, None]
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
    ay = dqy + ry + 11.0
    arch = ((qx / 17.0) ** 2 + (ay / 14.0) ** 2 < 1.0) & valid & (zz > _SACRUM_TOP - 80)
    m[arch] = _M["cortical_bone"]
    m[arch & ((qx / 9.0) ** 2 + (ay / 9.0) ** 2 < 1.0)] = _M["csf"]
    spinous = (qx / 5.0) ** 2 + ((dqy + ry + 34.0) / 16.0) ** 2 < 1.0
    m[spinous & (np.abs(ph) < 9.0) & mobile] = _M["cortical_bone"]
    lumbar = (zz > -130.0) & (zz < 15.0)
    transverse = ((np.abs(qx) - 34.0) / 16.0) ** 2 + ((dqy + ry + 6.0) / 6.0) ** 2 < 1.0
    m[transverse & (np.abs(ph) < 6.0) & lumbar] = _M["cortical_bone"]


def _paint_pelvis(mat, zc, cx, cy):
    """Iliac wings: 4 mm plates from the sacroiliac joints sweeping laterally and forwards."""
    sel = (zc > _ILIUM_Z[0]) & (zc < _ILIUM_Z[-1])
    if not sel.any():
        return
    kk = np.nonzero(sel)[0]
    ka, kb = int(kk[0]), int(kk[-1]) + 1
    z = zc[ka:kb]
    ax = np.interp(z, _ILIUM_Z, _ILIUM_AX).astype(np.float32)[:, None, None]
    by = np.interp(z, _ILIUM_Z, _ILIUM_BY).astype(np.float32)[:, None, None]
    x = cx[None, None, :]
    y = (cy - np.float32(_ILIUM_YC))[None, :, None]
    rho = np.sqrt((x / ax) ** 2 + (y / by) ** 2)
    plate = np.abs(rho - 1.0) * np.minimum(ax, by) < 2.0
    plate &= (np.abs(x) > 42.0) & (y > -40.0 - _ILIUM_YC) & (y < 40.0 - _ILIUM_YC)
    mat[ka:kb][plate] = _M["cortical_bone"]


def _paint_ribs(mat, zc, cx, dy, radial):
    """Ribs 1-12 with costal cartilage, just outside the cavity wall (``radial``: mm outside it along the ray)."""
    if zc.max() < -40.0 or zc.min() > 400.0:
        return
    near = np.abs(radial - 6.0) < 6.0
    idx = np.nonzero(near)
    if not len(idx[0]):
        return
    px, py = cx[idx[2]], dy[idx[0], idx[1]]
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
