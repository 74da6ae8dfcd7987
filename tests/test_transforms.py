"""RandElastic3Dd: untouched when it does not deform, MONAI's displacement statistics when it does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.layers import GaussianFilter
from monai.transforms import Rand3DElasticd

from flare23.errors import Flare23Error
from flare23.models.transforms import RandElastic3Dd


def _case(shape=(40, 36, 20), seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand((1, *shape), generator=g)
    label = torch.zeros((1, *shape), dtype=torch.uint8)
    label[:, 10:30, 8:28, 5:15] = 3
    label[:, 16:24, 14:22, 8:12] = 14
    return {"image": image, "label": label, "other": "kept"}


def test_no_deformation_returns_the_inputs_themselves():
    data = _case()
    t = RandElastic3Dd(["image", "label"], (9, 13), (0, 900), prob=0.0)
    out = t(data)
    assert out["image"] is data["image"] and out["label"] is data["label"] and out["other"] == "kept"
    # MONAI's resamples through an identity grid: new tensors, the label turned float
    monai_out = Rand3DElasticd(["image", "label"], (9, 13), (0, 900), prob=0.0, mode=["bilinear", "nearest"])(_case())
    assert monai_out["image"] is not data["image"] and monai_out["label"].dtype != torch.uint8


def test_probability_is_respected():
    t = RandElastic3Dd(["image"], (9, 13), (100, 200), prob=0.3)
    t.set_random_state(3)
    data = _case((24, 24, 12))
    changed = sum(t(data)["image"] is not data["image"] for _ in range(400))
    assert 0.25 < changed / 400 < 0.35


def test_zero_magnitude_is_the_identity():
    data = _case()
    out = RandElastic3Dd(["image", "label"], (9, 9), (0, 0), prob=1.0, mode=["bilinear", "nearest"])(data)
    assert torch.allclose(torch.as_tensor(out["image"]), data["image"], atol=1e-5)
    assert torch.equal(torch.as_tensor(out["label"]).to(torch.uint8), data["label"])


def test_one_field_moves_image_and_label_together():
    data = _case((48, 48, 24))
    data["image"] = data["label"].to(torch.float32)  # the image is the label: they must stay aligned
    t = RandElastic3Dd(["image", "label"], (9, 13), (400, 900), prob=1.0, mode=["nearest", "nearest"])
    t.set_random_state(5)
    out = t(data)
    img, lab = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
    assert torch.equal(img, lab.to(img.dtype))
    assert not torch.equal(lab.to(torch.uint8), data["label"])  # it did move
    assert set(torch.unique(lab).tolist()) <= {0.0, 3.0, 14.0}  # nearest keeps the label set


@pytest.mark.parametrize("shape", [(64, 64, 32), (96, 64, 24)])
@pytest.mark.parametrize("sigma", [9.0, 13.0])
def test_displacement_statistics_match_full_resolution_smoothing(shape, sigma):
    """Std and correlation length of the coarse-grid field match MONAI's full-resolution recipe."""
    rng = np.random.RandomState(int(sigma) + shape[0])
    t = RandElastic3Dd(["image"], (sigma, sigma), (1.0, 1.0), prob=1.0)
    t.set_random_state(int(sigma))
    ours, full, c_ours, c_full = [], [], [], []
    for _ in range(6):
        t.randomize(shape)
        assert t.factor == int(sigma // 3)
        a = t.displacement(shape)
        assert tuple(a.shape) == (3, *shape)
        noise = torch.as_tensor(rng.uniform(-1, 1, [3, *shape]).astype(np.float32))[None]
        b = GaussianFilter(3, sigma=sigma, truncated=3.0)(noise)[0]  # what Rand3DElasticd computes
        ours.append(a.std().item())
        full.append(b.std().item())
        c_ours.append(torch.corrcoef(torch.stack([a[0, :-6].flatten(), a[0, 6:].flatten()]))[0, 1].item())
        c_full.append(torch.corrcoef(torch.stack([b[0, :-6].flatten(), b[0, 6:].flatten()]))[0, 1].item())
    assert 0.85 < np.mean(ours) / np.mean(full) < 1.15
    assert abs(np.mean(c_ours) - np.mean(c_full)) < 0.03


def test_full_resolution_factor_one_is_monai_recipe():
    """coarse_factor=1 smooths the drawn noise itself: exactly GaussianFilter(noise) * magnitude."""
    t = RandElastic3Dd(["image"], (9, 9), (500, 500), prob=1.0, coarse_factor=1)
    t.set_random_state(0)
    t.randomize((30, 30, 16))
    expected = GaussianFilter(3, sigma=9.0, truncated=3.0)(torch.as_tensor(t.noise)[None])[0] * 500
    assert torch.allclose(t.displacement((30, 30, 16)), expected, atol=1e-5)


def test_deterministic_with_random_state():
    outs = []
    for _ in range(2):
        t = RandElastic3Dd(["image"], (9, 13), (0, 900), prob=1.0)
        t.set_random_state(11)
        outs.append(torch.as_tensor(t(_case())["image"]))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sigma_range": (0, 3)}, "sigma_range"),
        ({"sigma_range": (5, 3)}, "sigma_range"),
        ({"magnitude_range": (-1, 3)}, "magnitude_range"),
        ({"coarse_factor": 0}, "coarse_factor"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    args = {"sigma_range": (9, 13), "magnitude_range": (0, 900), **kwargs}
    with pytest.raises(Flare23Error, match=match):
        RandElastic3Dd(["image"], **args)


def test_two_dimensional_input_is_refused():
    with pytest.raises(Flare23Error, match="3D"):
        RandElastic3Dd(["image"], (9, 13), (0, 900), prob=1.0)({"image": torch.zeros(1, 8, 8)})
