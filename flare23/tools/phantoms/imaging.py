"""Pass 3 of a phantom: the CT image (int16 HU) from the material map, slab by slab along z with a halo."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from flare23.tools.phantoms.anatomy import _HU_CLIP, _IMAGE_SLAB_VOXELS, _TRUNCATE


def _blur_sigma(spacing) -> tuple[float, float, float]:
    """Gaussian blur (z, y, x) in voxels: partial volume (sigma 0.5 voxel) combined with a 0.55 mm in-plane PSF."""
    return (0.5, float(np.hypot(0.5, 0.55 / spacing[1])), float(np.hypot(0.5, 0.55 / spacing[0])))


def _noise_gain(sig) -> float:
    """Std of white noise after the blur ``sig``, to scale the noise to ``noise_std`` after blurring."""
    gain = 1.0
    for s in sig:
        delta = np.zeros(41)
        delta[20] = 1.0
        gain *= float(np.sqrt((ndimage.gaussian_filter1d(delta, s, mode="constant", truncate=_TRUNCATE) ** 2).sum()))
    return gain


def _render_image(case, material, hu, tex, texture, noise_std: float, pad_value: int | None) -> np.ndarray:
    """The (z, y, x) int16 image of ``material`` (codes) with HU ``hu``, texture ``tex`` x the field ``texture``.

    White noise is drawn per slice from a seed of its own (so the result does not depend on the slab
    size) and blurred with the image; ``pad_value``: value outside the scanner's circular field of
    view (None: no padding).
    """
    nz, ny, nx = material.shape
    sig = _blur_sigma(case["spacing"])
    white = np.float32(noise_std / _noise_gain(sig))
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
        mat = material[a0:a1]
        img = hu[mat]
        img += tex[mat] * texture(slice(a0, a1), slice(0, ny), slice(0, nx))
        for k in range(a0, a1):
            g = np.random.default_rng([case["seed"], 4, k])
            img[k - a0] += g.standard_normal((ny, nx), dtype=np.float32) * white
        img = ndimage.gaussian_filter(img, sig, mode="nearest", truncate=_TRUNCATE)
        img = img[k0 - a0 : k1 - a0]
        np.clip(np.rint(img), *_HU_CLIP, out=img)
        res = img.astype(np.int16)
        if circle is not None:
            res[:, circle] = pad_value
        out[k0:k1] = res
    return out
