"""Builds one phantom's label and image volumes: the case's random draws, then three passes.

Pass 1 (:mod:`~flare23.tools.phantoms.body`, with :mod:`~flare23.tools.phantoms.skeleton` and
:mod:`~flare23.tools.phantoms.painter`): material map and organ labels, slab by slab. Pass 2
(:mod:`~flare23.tools.phantoms.tumors`): tumors. Pass 3 (:mod:`~flare23.tools.phantoms.imaging`):
the CT image. Geometry and deformation live in :mod:`~flare23.tools.phantoms.grid`.
"""

from __future__ import annotations

import numpy as np

from flare23.tools.phantoms.anatomy import _canonical_organs, _canonical_others
from flare23.tools.phantoms.body import _AnatomyPass, _dome
from flare23.tools.phantoms.cases import _jitter_organs, _sample_hu
from flare23.tools.phantoms.fields import _Field
from flare23.tools.phantoms.grid import _Grid
from flare23.tools.phantoms.imaging import _render_image
from flare23.tools.phantoms.painter import _Painter
from flare23.tools.phantoms.tumors import _TumorPass


class _Builder:
    """Builds one case on its RAS grid; internal arrays are ordered (z, y, x).

    Call :meth:`anatomy`, :meth:`tumors` and :meth:`image` in this order. Afterwards ``material``
    (tissue codes), ``label`` (organs and tumors), ``organs_map`` (organs before the tumors) and
    ``hu`` (HU per material code, tumors included) describe the case.
    """

    def __init__(self, case: dict):
        self.case = case
        rng = np.random.default_rng([case["seed"], 2])
        # the order of the draws below defines the case: keep it
        case["dome_shift"] = (rng.normal(0, 6), rng.normal(0, 6))
        self.grid = g = _Grid(case, rng)  # draws the smooth deformation
        # fields: tissue texture, organ boundary perturbation, bowel loops, bowel gas
        self.texture = _Field(rng, g.xs, g.ys, g.zs, sigma=rng.uniform(6.0, 10.0))
        self.shape = _Field(rng, g.xs, g.ys, g.zs, sigma=rng.uniform(16.0, 24.0))
        self.bowel = _Field(rng, g.xs, g.ys, g.zs, sigma=rng.uniform(9.0, 12.0))
        self.bubbles = _Field(rng, g.xs, g.ys, g.zs, sigma=6.0)
        self.hu, self.tex = _sample_hu(rng, case["phase"])
        self.stomach_gas = rng.uniform(52.0, 80.0)  # canonical y above which the stomach holds gas
        self.duodenum_gas = rng.uniform(50.0, 75.0)
        self.esophagus_air = bool(rng.random() < 0.4)
        self.bowel_gas = rng.uniform(0.75, 1.1)  # threshold on the bubble field
        self.organs = _jitter_organs(rng, _canonical_organs(), case)
        self.others = _jitter_organs(rng, _canonical_others(), case)

    def anatomy(self) -> None:
        """Pass 1: ``material`` and ``label``."""
        g = self.grid
        dome2d = _dome(self.case["dome_shift"], g.cx[None, :], g.cy[:, None])  # (y, x), undeformed
        painter = _Painter(g, dome2d, self.shape, self.bubbles, self.stomach_gas, self.duodenum_gas, self.esophagus_air)
        body = _AnatomyPass(self.case, g, dome2d, painter, self.bowel, self.bubbles, self.bowel_gas)
        self.material, self.label = body.run(self.organs, self.others)

    def tumors(self, want: bool) -> list[dict]:
        """Pass 2: keeps the organ labels as ``organs_map``, then places tumors if ``want``; returns their descriptions."""
        self.organs_map = self.label.copy()
        if not want:
            return []
        passes = _TumorPass(self.case, self.grid, self.shape, self.label, self.material, self.hu, self.tex)
        return passes.run(self.organs_map)

    def image(self, noise_std: float, pad_value: int | None) -> np.ndarray:
        """Pass 3: the (z, y, x) int16 CT image."""
        return _render_image(self.case, self.material, self.hu, self.tex, self.texture, noise_std, pad_value)
