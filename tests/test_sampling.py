"""Class-centred patch selection: empirical shares of patch centres versus the configured ratios."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import RandCropByLabelClassesd

from flare23.constants import NUM_CLASSES, ORGAN_IDS, TUMOR_ID
from flare23.errors import Flare23Error
from flare23.models.sampling import (
    RandCropByLabelClassesFallbackd,
    RandRoiContextCropd,
    effective_ratios,
    organ_ratios,
    tumor_ratios,
)

torch.set_num_threads(1)
PATCH = (4, 4, 4)
DRAWS = 2000


def hand_built_label(present: list[int], shape=(30, 30, 12)) -> np.ndarray:
    """Background volume with one small block per class in ``present``, all far from the borders.

    Blocks have different sizes (so that voxel counts do not equal the configured ratios) and lie
    at least 2 voxels inside, so a 4^3 patch centred on any of their voxels needs no shifting.
    """
    lab = np.zeros(shape, dtype=np.int16)
    for n, c in enumerate(present):
        x0, y0 = 3 + 6 * (n % 4), 3 + 6 * ((n // 4) % 4)
        size = 1 + (c % 4)
        lab[x0 : x0 + size, y0 : y0 + size, 4 : 4 + 1 + (c % 3)] = c
    return lab


def draw_centres(transform, lab: np.ndarray, draws: int = DRAWS) -> np.ndarray:
    """Labels at the crop centres of ``draws`` patches chosen by ``transform`` for the case ``lab``."""
    label = MetaTensor(torch.as_tensor(lab[None]))
    per_call = transform.cropper.num_samples
    centre_labels = []
    for _ in range(draws // per_call):
        transform.randomize(label)
        centre_labels += [int(lab[tuple(int(v) for v in c)]) for c in transform.cropper.centers]
    return np.asarray(centre_labels)


def test_patches_are_centred_on_the_drawn_voxel():
    lab = hand_built_label(list(range(1, 15)))
    t = make(organ_ratios(), seed=1, num_samples=50)
    patches = t(
        {"image": MetaTensor(torch.as_tensor(lab[None], dtype=torch.float32)), "label": MetaTensor(torch.as_tensor(lab[None]))}
    )
    assert len(patches) == 50
    half = [s // 2 for s in PATCH]
    for patch in patches:
        cx, cy, cz = patch["label"].meta["crop_center"]
        assert tuple(patch["label"].shape[1:]) == PATCH
        assert int(patch["label"][0, half[0], half[1], half[2]]) == int(lab[cx, cy, cz]) > 0
        assert torch.equal(patch["image"][0].long(), patch["label"][0].long())  # image and label cropped alike


def shares(values: np.ndarray) -> np.ndarray:
    return np.bincount(values, minlength=NUM_CLASSES) / len(values)


def make(ratios, fallback=None, seed=0, num_samples=100):
    t = RandCropByLabelClassesFallbackd(
        keys=["image", "label"], label_key="label", spatial_size=PATCH, ratios=ratios, num_classes=NUM_CLASSES,
        num_samples=num_samples, fallback_ratios=fallback,
    )  # fmt: skip
    t.set_random_state(seed)
    return t


@pytest.mark.parametrize(
    "name, ratios, present",
    [
        ("organ-centred, every class present", organ_ratios(), list(range(1, 15))),
        ("organ-centred, small organs absent", organ_ratios(), [1, 2, 3, 4, 5, 6, 11, 12, 13, 14]),
        ("tumor-centred 50/50 with organs", tumor_ratios(tumor=13.0, organ=1.0), list(range(1, 15))),
        ("uneven ratios, some absent", [0.5, 3, 0, 1, 2, 0, 1, 0, 4, 1, 0, 0, 2, 1, 5], [1, 2, 3, 4, 5, 8, 9, 12, 14]),
    ],
)
def test_centre_shares_match_configured_ratios(name, ratios, present):
    lab = hand_built_label(present)
    got = shares(draw_centres(make(ratios, seed=len(name)), lab))
    # expected: configured ratios restricted to the classes present, renormalised
    expected = np.array([r if (lab == c).any() else 0.0 for c, r in enumerate(ratios)])
    expected /= expected.sum()
    assert np.abs(got - expected).max() < 0.03, (name, got.round(3), expected.round(3))
    assert np.all(got[expected == 0] == 0)


def test_tumor_only_ratios_on_case_without_tumor_fall_back_to_organs():
    present = [1, 2, 3, 5, 11, 13]
    lab = hand_built_label(present)
    only_tumor = tumor_ratios(tumor=1.0, organ=0.0)
    # plain MONAI cannot draw: every positive-ratio class is absent
    plain = RandCropByLabelClassesd(
        keys=["label"], label_key="label", spatial_size=PATCH, ratios=only_tumor, num_classes=NUM_CLASSES, warn=False
    )
    with pytest.raises(ValueError), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's 0/0 in MONAI's ratio normalisation
        plain({"label": MetaTensor(torch.as_tensor(lab[None]))})
    got = shares(draw_centres(make(only_tumor, fallback=organ_ratios(), seed=3), lab))
    expected = np.zeros(NUM_CLASSES)
    expected[present] = 1.0 / len(present)
    assert np.abs(got - expected).max() < 0.03, got.round(3)


def test_with_tumor_present_fallback_is_unused():
    lab = hand_built_label(list(range(1, 15)))
    got = shares(draw_centres(make(tumor_ratios(), fallback=organ_ratios(), seed=4), lab, draws=300))
    assert got[TUMOR_ID] == 1.0


def test_empty_label_gives_uniform_random_voxel():
    lab = np.zeros((30, 30, 12), dtype=np.int16)
    t = make(organ_ratios(), fallback=None, seed=5, num_samples=DRAWS)
    t.randomize(MetaTensor(torch.as_tensor(lab[None])))
    assert t.last_ratios[0] > 0 and sum(t.last_ratios[1:]) == 0
    # centres are uniform over the valid centre range of each axis (crop centres are clamped to keep the patch inside)
    centres = np.asarray(t.cropper.centers, dtype=float)
    for axis, size in enumerate(lab.shape):
        lo, hi = PATCH[axis] // 2, size - PATCH[axis] // 2
        assert centres[:, axis].min() >= lo and centres[:, axis].max() <= hi
        inner = centres[(centres[:, axis] > lo) & (centres[:, axis] < hi), axis]
        counts = np.bincount(inner.astype(int), minlength=hi)[lo + 1 : hi]
        assert counts.std() / counts.mean() < 0.3  # flat histogram inside the clamped edges


def test_effective_ratios():
    sizes = [100, 5, 0, 7] + [0] * 11
    assert effective_ratios(organ_ratios(), sizes) == [0.0, 1.0, 0.0, 1.0] + [0.0] * 11
    assert effective_ratios(tumor_ratios(), sizes, organ_ratios()) == [0.0, 1.0, 0.0, 1.0] + [0.0] * 11
    assert effective_ratios(tumor_ratios(), sizes) == [float(s) for s in sizes]
    with pytest.raises(Flare23Error, match="empty"):
        effective_ratios(tumor_ratios(), [0] * 15)


def test_ratio_presets():
    r = organ_ratios()
    assert [i for i, x in enumerate(r) if x > 0] == list(ORGAN_IDS)
    t = tumor_ratios(tumor=13.0, organ=1.0)
    assert t[TUMOR_ID] == 13.0 and t[0] == 0.0 and sum(t) == 26.0


@pytest.mark.parametrize(
    "ratios, match", [([1.0] * 3, "expected 15 ratios"), ([-1.0] + [1.0] * 14, ">= 0"), ([0.0] * 15, "positive")]
)
def test_bad_ratios(ratios, match):
    with pytest.raises(Flare23Error, match=match):
        make(ratios)


# --- RandRoiContextCropd: the ROI box's context in training ------------------------------------
def _context_case(affine, shape=(40, 36, 30), box=((10, 25), (12, 20), (8, 18))):
    label = np.zeros((1, *shape), np.uint8)
    label[0, box[0][0] : box[0][1], box[1][0] : box[1][1], box[2][0] : box[2][1]] = 3
    label[0, box[0][0], box[1][0], box[2][0]] = 7
    image = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    a = torch.as_tensor(affine, dtype=torch.float64)
    return {"image": MetaTensor(torch.as_tensor(image), affine=a), "label": MetaTensor(torch.as_tensor(label), affine=a)}


def _fixed(feet, head, inplane):
    return {"feet": [feet, feet], "head": [head, head], "inplane": [inplane, inplane]}


def test_context_crop_margins_are_physical_and_exact():
    # spacing 2 x 2 x 3 mm; RAS: the feet are at low slice index, LPS with the slice axis flipped: at high index
    ras = np.diag([2.0, 2.0, 3.0, 1.0])
    flipped = np.diag([-2.0, -2.0, -3.0, 1.0])
    for affine, feet_low in ((ras, True), (flipped, False)):
        t = RandRoiContextCropd(["image", "label"], margins_mm=_fixed(feet=9.0, head=3.0, inplane=3.0))
        t.set_random_state(0)
        out = t(_context_case(affine))
        # in-plane 3 mm / 2 mm -> 2 voxels each side; feet 9 mm / 3 mm -> 3 slices; head 3 mm -> 1 slice
        z = (8 - 3, 18 + 1) if feet_low else (8 - 1, 18 + 3)
        assert t.last_box == (slice(8, 27), slice(10, 22), slice(*z))
        assert tuple(out["image"].shape[1:]) == (19, 12, z[1] - z[0])
        # the crop keeps the image's voxels and moves the affine with them
        assert torch.equal(out["image"].as_tensor(), _context_case(affine)["image"][:, 8:27, 10:22, z[0] : z[1]].as_tensor())
        corner = np.asarray(affine) @ np.array([8, 10, z[0], 1.0])
        np.testing.assert_allclose(np.asarray(out["image"].affine)[:, 3], corner)
        assert int((out["label"] > 0).sum()) == int((_context_case(affine)["label"] > 0).sum())


def test_context_crop_draws_every_side_within_its_range():
    t = RandRoiContextCropd(["image", "label"], margins_mm={"feet": [0, 12], "head": [3, 6], "inplane": [0, 8]})
    t.set_random_state(1)
    seen = {k: set() for k in ("x0", "x1", "z0", "z1")}
    for _ in range(200):
        t(_context_case(np.diag([2.0, 2.0, 3.0, 1.0])))
        b = t.last_box
        seen["x0"].add(10 - b[0].start), seen["x1"].add(b[0].stop - 25)
        seen["z0"].add(8 - b[2].start), seen["z1"].add(b[2].stop - 18)
    # voxels = ceil(mm / spacing): 0 only for a draw of exactly 0 mm
    assert seen["x0"] == {1, 2, 3, 4} and seen["x1"] == {1, 2, 3, 4}  # ceil(U(0, 8) / 2)
    assert seen["z0"] == {1, 2, 3, 4}  # feet: ceil(U(0, 12) / 3)
    assert seen["z1"] == {2}  # head: ceil(U(3, 6) / 3), never more than 6 mm


def test_context_crop_grows_to_min_size_inside_the_volume_and_maps_class_indices():
    from monai.transforms import ClassesToIndicesd

    data = ClassesToIndicesd("label", num_classes=8, indices_postfix="_cls_indices")(_context_case(np.eye(4)))
    t = RandRoiContextCropd(
        ["image", "label"], margins_mm=_fixed(0, 0, 0), min_size=(24, 32, 12), indices_key="label_cls_indices"
    )
    out = t(data)
    b = t.last_box
    assert tuple(s.stop - s.start for s in b) == (24, 32, 12)
    assert all(0 <= s.start and s.stop <= n for s, n in zip(b, (40, 36, 30)))
    assert b[0].start <= 10 and b[0].stop >= 25 and b[1].start <= 12 and b[1].stop >= 20
    flat = out["label"][0].flatten()
    for c in (0, 3, 7):
        ix = torch.as_tensor(out["label_cls_indices"][c])
        assert len(ix) == int((flat == c).sum())  # every voxel of the class, and only those
        assert bool((flat[ix] == c).all())


def test_context_crop_leaves_empty_labels_and_prob_zero_alone():
    data = _context_case(np.eye(4))
    data["label"] = data["label"] * 0
    out = RandRoiContextCropd(["image", "label"], margins_mm=_fixed(0, 0, 0))(data)
    assert out["image"].shape == data["image"].shape
    out = RandRoiContextCropd(["image", "label"], margins_mm=_fixed(0, 0, 0), prob=0.0)(_context_case(np.eye(4)))
    assert out["image"].shape == (1, 40, 36, 30)


@pytest.mark.parametrize(
    "margins, prob, match",
    [({"up": [0, 1]}, 1.0, "unknown direction"), ({"feet": [5, 1]}, 1.0, "0 <= low <= high"),
     ({"feet": 3}, 1.0, "pair"), ({"feet": [-1, 1]}, 1.0, "0 <= low"), ({}, 1.5, "prob")],
)  # fmt: skip
def test_context_crop_rejects_bad_settings(margins, prob, match):
    with pytest.raises(Flare23Error, match=match):
        RandRoiContextCropd(["image", "label"], margins_mm=margins, prob=prob)


# --- lesion-balanced centres ---------------------------------------------------------------------


def three_lesions(shape=(40, 40, 24)) -> tuple[np.ndarray, list[np.ndarray]]:
    """An organ (label 1) holding three tumors (label 14) of 8, 64 and 512 voxels, far from the borders.

    Returns the label and the boolean mask of each tumor (the lesions touch neither each other nor
    the volume's border, so a 4^3 patch centred on any of their voxels needs no shifting).
    """
    lab = np.zeros(shape, dtype=np.int16)
    lab[2:38, 2:38, 2:22] = 1
    boxes = [
        (slice(4, 6), slice(4, 6), slice(4, 6)),
        (slice(10, 14), slice(4, 8), slice(4, 8)),
        (slice(20, 28), slice(20, 28), slice(8, 16)),
    ]
    masks = []
    for box in boxes:
        lab[box] = TUMOR_ID
        m = np.zeros(shape, bool)
        m[box] = True
        masks.append(m)
    return lab, masks


def _lesion_shares(lab, masks, weights_on: bool, draws: int = 3000, power: float = 1.0, max_samples=None):
    from monai.transforms import ClassesToIndicesd

    from flare23.models.sampling import ClassComponentWeightsd

    d = {"label": MetaTensor(torch.as_tensor(lab[None]))}
    d = ClassesToIndicesd("label", num_classes=NUM_CLASSES, indices_postfix="_cls_indices", max_samples_per_class=max_samples)(d)
    d = ClassComponentWeightsd("label", classes=[TUMOR_ID] if weights_on else [], power=power)(d)
    t = RandCropByLabelClassesFallbackd(
        "label", "label", PATCH, tumor_ratios(), NUM_CLASSES, indices_key="label_cls_indices", weights_key="label_cls_weights"
    )
    t.set_random_state(7)
    hits = np.zeros(len(masks))
    for _ in range(draws):
        out = t(d)[0]
        assert "label_cls_weights" not in out and "label_cls_indices" not in out
        c = tuple(int(v) for v in t.cropper.centers[0])
        hits += [m[c] for m in masks]
    assert hits.sum() == draws  # every centre on a tumor voxel: tumor-only ratios
    return hits / draws


def test_lesion_balanced_centres_draw_each_lesion_equally_often_voxel_uniform_follows_volume():
    lab, masks = three_lesions()
    sizes = np.array([m.sum() for m in masks], float)
    # MONAI's draw: shares follow the volumes (8, 64, 512 voxels -> 1.4 %, 11 %, 88 %)
    plain = _lesion_shares(lab, masks, weights_on=False)
    np.testing.assert_allclose(plain, sizes / sizes.sum(), atol=0.02)
    # balanced: a third each, whatever the size
    balanced = _lesion_shares(lab, masks, weights_on=True)
    np.testing.assert_allclose(balanced, [1 / 3] * 3, atol=0.03)
    # power 0.5: proportional to sqrt(size)
    half = _lesion_shares(lab, masks, weights_on=True, power=0.5)
    np.testing.assert_allclose(half, np.sqrt(sizes) / np.sqrt(sizes).sum(), atol=0.03)


def test_lesion_balance_stays_exact_when_class_indices_are_subsampled():
    lab, masks = three_lesions()
    # ClassesToIndicesd keeps 100 of the 584 tumor voxels: counts must be those of the listed voxels
    balanced = _lesion_shares(lab, masks, weights_on=True, max_samples=100, draws=3000)
    from monai.transforms import ClassesToIndicesd

    from flare23.models.sampling import ClassComponentWeightsd

    d = ClassesToIndicesd("label", num_classes=NUM_CLASSES, indices_postfix="_cls_indices", max_samples_per_class=100)(
        {"label": MetaTensor(torch.as_tensor(lab[None]))}
    )
    d = ClassComponentWeightsd("label", classes=[TUMOR_ID])(d)
    flat = np.asarray(d["label_cls_indices"][TUMOR_ID])
    w = d["label_cls_weights"][TUMOR_ID]
    listed = [np.isin(flat, np.flatnonzero(m.ravel())) for m in masks]
    present = [k for k, sel in enumerate(listed) if sel.any()]
    totals = [w[listed[k]].sum() for k in present]
    np.testing.assert_allclose(totals, 1.0)  # each listed lesion's weights sum to 1 (power 1)
    np.testing.assert_allclose(balanced[present], 1 / len(present), atol=0.035)
    assert all(wk is None for c, wk in enumerate(d["label_cls_weights"]) if c != TUMOR_ID)


def test_component_weights_against_direct_count_and_bad_indices():
    from scipy import ndimage

    from flare23.models.sampling import component_weights

    rng = np.random.default_rng(0)
    lab = (rng.random((20, 20, 10)) < 0.08).astype(np.int16) * TUMOR_ID  # many scattered lesions
    flat = np.flatnonzero(lab.ravel() == TUMOR_ID)
    comps, n = ndimage.label(lab == TUMOR_ID, structure=np.ones((3, 3, 3)))  # independent 26-connectivity
    sizes = np.bincount(comps.ravel())
    expect = 1.0 / sizes[comps.ravel()[flat]]
    np.testing.assert_allclose(component_weights(lab, flat, TUMOR_ID), expect)
    np.testing.assert_allclose(component_weights(lab, flat, TUMOR_ID, power=0.0), 1.0)
    # 6-connectivity splits diagonal neighbours: more components
    comps6, n6 = ndimage.label(lab == TUMOR_ID)
    assert n6 > n
    np.testing.assert_allclose(
        component_weights(lab, flat, TUMOR_ID, connectivity=1), 1.0 / np.bincount(comps6.ravel())[comps6.ravel()[flat]]
    )
    assert component_weights(lab, flat[:0], TUMOR_ID).size == 0
    with pytest.raises(Flare23Error, match="not voxels of that class"):
        component_weights(lab, np.flatnonzero(lab.ravel() == 0)[:3], TUMOR_ID)


def test_context_crop_keeps_weights_parallel_to_the_indices_it_maps():
    from monai.transforms import ClassesToIndicesd

    from flare23.models.sampling import ClassComponentWeightsd, component_weights

    lab, masks = three_lesions(shape=(60, 60, 40))
    label = MetaTensor(torch.as_tensor(lab[None]), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    d = ClassesToIndicesd("label", num_classes=NUM_CLASSES, indices_postfix="_cls_indices")({"label": label})
    # background too: its voxels outside the box drop out, and their weights with them
    d = ClassComponentWeightsd("label", classes=[0, TUMOR_ID])(d)
    crop = RandRoiContextCropd(
        "label",
        margins_mm={"feet": (0, 10), "head": (0, 10), "inplane": (0, 6)},
        indices_key="label_cls_indices",
        weights_key="label_cls_weights",
    )
    crop.set_random_state(3)
    for _ in range(5):
        out = crop(d)
        ix, w = out["label_cls_indices"], out["label_cls_weights"]
        assert all(wc is None for c, wc in enumerate(w) if c not in (0, TUMOR_ID))
        assert len(w[0]) == len(ix[0])
        assert len(w[TUMOR_ID]) == len(ix[TUMOR_ID]) == sum(m.sum() for m in masks)
        np.testing.assert_allclose(w[TUMOR_ID], component_weights(out["label"][0], ix[TUMOR_ID], TUMOR_ID))
        assert len(ix[0]) < len(d["label_cls_indices"][0])  # background outside the box dropped


def test_lesion_balance_off_is_monai_and_bad_settings_fail():
    from flare23.models.sampling import ClassComponentWeightsd

    lab, _ = three_lesions()
    d = {"label": MetaTensor(torch.as_tensor(lab[None]))}
    assert ClassComponentWeightsd("label", classes=[])(d).keys() == d.keys()  # switched off: nothing written
    # without weights, the same centres as MONAI's own transform from the same seed
    ours = RandCropByLabelClassesFallbackd(
        "label", "label", PATCH, tumor_ratios(organ=1.0), NUM_CLASSES, weights_key="label_cls_weights"
    )
    monai = RandCropByLabelClassesd("label", "label", PATCH, ratios=tumor_ratios(organ=1.0), num_classes=NUM_CLASSES, warn=False)
    ours.set_random_state(11)
    monai.set_random_state(11)
    for _ in range(20):
        ours(d)
        monai(d)
        assert [tuple(map(int, c)) for c in ours.cropper.centers] == [tuple(map(int, c)) for c in monai.cropper.centers]
    for kwargs, match in (({"power": 1.5}, "power"), ({"connectivity": 4}, "connectivity"), ({"classes": [-1]}, "class ids")):
        with pytest.raises(Flare23Error, match=match):
            ClassComponentWeightsd("label", **kwargs)
    with pytest.raises(Flare23Error, match="ClassesToIndicesd"):
        ClassComponentWeightsd("label", classes=[TUMOR_ID])(d)


def test_uniform_voxel_fallback_ignores_lesion_weights():
    """No voxel of the configured classes and no fallback ratios: a voxel drawn uniformly, weights or not."""
    from monai.transforms import ClassesToIndicesd

    from flare23.models.sampling import ClassComponentWeightsd

    lab = np.zeros((30, 30, 20), dtype=np.int16)
    lab[3:5, 3:5, 3:5] = 1  # 8 voxels
    lab[10:22, 10:22, 5:17] = 1  # 1728 voxels, another component of the same class
    d = ClassesToIndicesd("label", num_classes=NUM_CLASSES, indices_postfix="_cls_indices")(
        {"label": MetaTensor(torch.as_tensor(lab[None]))}
    )
    d = ClassComponentWeightsd("label", classes=[1])(d)  # balanced, the two blocks would be drawn 1:1
    t = RandCropByLabelClassesFallbackd(
        "label", "label", PATCH, tumor_ratios(), NUM_CLASSES, indices_key="label_cls_indices", weights_key="label_cls_weights"
    )
    t.set_random_state(5)
    small = large = 0
    for _ in range(3000):
        t(d)
        c = tuple(int(v) for v in t.cropper.centers[0])
        small += 3 <= c[0] < 5 and 3 <= c[1] < 5 and 3 <= c[2] < 5
        large += 10 <= c[0] < 22 and 10 <= c[1] < 22 and 5 <= c[2] < 17
    assert t.last_ratios == [float(n) for n in np.bincount(lab.ravel(), minlength=NUM_CLASSES)]
    assert large / 3000 == pytest.approx(1728 / lab.size, abs=0.03)  # uniform over the volume
    assert small / 3000 < 0.01  # not the 1:1 of the weights
