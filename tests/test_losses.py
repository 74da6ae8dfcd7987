"""The weighted compound loss against a direct NumPy transcription of the paper's eq. 1-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flare23.constants import NUM_CLASSES, TUMOR_ID
from flare23.errors import Flare23Error
from flare23.models.losses import StackedDeepSupervisionLoss, WeightedDiceFocalLoss, class_weights

torch.set_num_threads(1)


def eq1_to_4(logits, labels, weights, lam, gamma, alpha, smooth, include_background, reduction, dice_mode="global"):
    """Paper eq. 1-4 written out with explicit loops over classes c (float64 NumPy).

    logits: (B, C, ...) array; labels: (B, ...) integer array. b runs over every voxel of the batch.
    """
    n_batch, n_cls = logits.shape[:2]
    z = logits.reshape(n_batch, n_cls, -1).astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)  # softmax over classes
    lab = labels.reshape(n_batch, -1)
    g = np.stack([(lab == c).astype(np.float64) for c in range(n_cls)], axis=1)
    w = np.ones(n_cls) if weights is None else np.asarray(weights, dtype=np.float64)

    dice_classes = range(0 if include_background else 1, n_cls)
    numerator = 0.0
    denominator = 0.0
    for c in dice_classes:  # eq. 2
        numerator += w[c] * np.sum(p[:, c] * g[:, c])
        denominator += np.sum(p[:, c] + g[:, c])
    l_d = -(2.0 * numerator + smooth) / (denominator + smooth)
    if dice_mode == "per_class":  # the public code's form: a ratio per class, weighted mean
        ratios = [(2.0 * np.sum(p[:, c] * g[:, c]) + smooth) / (np.sum(p[:, c] + g[:, c]) + smooth) for c in dice_classes]
        l_d = -sum(w[c] * r for c, r in zip(dice_classes, ratios)) / sum(w[c] for c in dice_classes)

    l_f = 0.0
    for c in range(n_cls):  # eq. 3 with p_t from eq. 4
        p_t = np.where(g[:, c] == 1, p[:, c], 1.0 - p[:, c])
        l_f += alpha * w[c] * np.sum((1.0 - p_t) ** gamma * np.log(p_t))
    l_f = -l_f
    if reduction == "mean":
        l_f /= lab.size
    return l_d + lam * l_f  # eq. 1


SETTINGS = [
    dict(class_weights=None, lambda_focal=1.0, gamma=2.0, alpha=1.0, include_background=False, focal_reduction="mean"),
    dict(
        class_weights=[1.0] * TUMOR_ID + [2.0],
        lambda_focal=1.0,
        gamma=2.0,
        alpha=1.0,
        include_background=False,
        focal_reduction="mean",
    ),
    dict(
        class_weights=[1.0] * 7 + [2.0, 2.0, 2.0, 2.0] + [1.0] * 4,
        lambda_focal=0.5,
        gamma=1.5,
        alpha=0.25,
        include_background=False,
        focal_reduction="sum",
    ),
    dict(class_weights="random", lambda_focal=2.0, gamma=0.0, alpha=1.0, include_background=True, focal_reduction="mean"),
    dict(class_weights="random", lambda_focal=1.0, gamma=3.0, alpha=2.0, include_background=True, focal_reduction="sum"),
    dict(
        class_weights=None,
        lambda_focal=1.0,
        gamma=2.0,
        alpha=1.0,
        include_background=False,
        focal_reduction="mean",
        dice_mode="per_class",
    ),
    dict(
        class_weights="random",
        lambda_focal=0.5,
        gamma=2.0,
        alpha=1.0,
        include_background=True,
        focal_reduction="mean",
        dice_mode="per_class",
    ),
]


@pytest.mark.parametrize("setting", range(len(SETTINGS)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_matches_numpy_equations(setting, dtype):
    rng = np.random.default_rng(100 + setting)
    kwargs = dict(SETTINGS[setting])
    if kwargs["class_weights"] == "random":
        kwargs["class_weights"] = rng.uniform(0.2, 3.0, NUM_CLASSES).tolist()
    logits = rng.normal(0.0, 2.0, (2, NUM_CLASSES, 5, 6, 4))
    labels = rng.integers(0, NUM_CLASSES, (2, 5, 6, 4))
    labels[labels == 9] = 3  # one class absent everywhere
    loss_fn = WeightedDiceFocalLoss(smooth=1e-5, **kwargs)
    got = loss_fn(torch.tensor(logits, dtype=dtype), torch.tensor(labels[:, None])).item()
    want = eq1_to_4(
        logits,
        labels,
        kwargs["class_weights"],
        kwargs["lambda_focal"],
        kwargs["gamma"],
        kwargs["alpha"],
        1e-5,
        kwargs["include_background"],
        kwargs["focal_reduction"],
        kwargs.get("dice_mode", "global"),
    )
    if dtype == torch.float64:
        assert got == pytest.approx(want, abs=1e-5, rel=1e-9)
    else:
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_one_hot_target_equals_label_map():
    rng = np.random.default_rng(1)
    logits = torch.tensor(rng.normal(size=(2, NUM_CLASSES, 4, 4, 3)))
    labels = torch.tensor(rng.integers(0, NUM_CLASSES, (2, 1, 4, 4, 3)))
    onehot = torch.nn.functional.one_hot(labels[:, 0], NUM_CLASSES).permute(0, 4, 1, 2, 3)
    loss_fn = WeightedDiceFocalLoss(class_weights=rng.uniform(1, 2, NUM_CLASSES).tolist())
    assert loss_fn(logits, labels).item() == pytest.approx(loss_fn(logits, onehot).item(), abs=1e-12)


def test_perfect_prediction_limits():
    """Confident correct logits: Dice ratio -> -1 (unit weights), focal -> 0; weights scale the Dice numerator."""
    labels = torch.randint(0, NUM_CLASSES, (1, 1, 6, 6, 6), generator=torch.Generator().manual_seed(0))
    logits = 60.0 * torch.nn.functional.one_hot(labels[:, 0], NUM_CLASSES).permute(0, 4, 1, 2, 3).double()
    assert WeightedDiceFocalLoss()(logits, labels).item() == pytest.approx(-1.0, abs=1e-6)
    # all foreground weights 2 -> numerator doubles, focal still ~0
    assert WeightedDiceFocalLoss(class_weights=[1.0] + [2.0] * 14)(logits, labels).item() == pytest.approx(-2.0, abs=1e-6)


@pytest.mark.parametrize("dice_mode", ["global", "per_class"])
def test_gradient_finite_with_absent_classes_and_extreme_logits(dice_mode):
    labels = torch.zeros(2, 1, 6, 5, 4, dtype=torch.long)
    labels[:, :, 1:3, 1:3, 1:3] = 3  # only background and class 3 present
    logits = torch.randn(2, NUM_CLASSES, 6, 5, 4) * 40.0  # saturated softmax: p ~ 0 or 1
    logits[:, 3] += 100.0  # even a confidently wrong channel everywhere
    logits.requires_grad_(True)
    loss = WeightedDiceFocalLoss(class_weights=[1.0] * TUMOR_ID + [2.0], dice_mode=dice_mode)(logits, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(torch.isfinite(logits.grad))
    assert logits.grad.abs().sum() > 0


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    logits = torch.tensor(rng.normal(size=(1, 4, 3, 3, 2)), requires_grad=True)
    labels = torch.tensor(rng.integers(0, 3, (1, 1, 3, 3, 2)))  # class 3 absent
    loss_fn = WeightedDiceFocalLoss(class_weights=[0.5, 1.0, 2.0, 1.5], gamma=2.0, lambda_focal=1.0)
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, labels), (logits,), eps=1e-6, atol=1e-6)


def test_deep_supervision_unbinds_stacked_output():
    rng = np.random.default_rng(5)
    base = WeightedDiceFocalLoss()
    stacked = torch.tensor(rng.normal(size=(2, 3, NUM_CLASSES, 4, 4, 4)))  # (B, L, C, ...)
    labels = torch.tensor(rng.integers(0, NUM_CLASSES, (2, 1, 4, 4, 4)))
    per_level = [base(stacked[:, i], labels).item() for i in range(3)]
    raw = [0.5**i for i in range(3)]
    want = sum(r / sum(raw) * v for r, v in zip(raw, per_level))
    ds = StackedDeepSupervisionLoss(base)
    assert ds(stacked, labels).item() == pytest.approx(want, rel=1e-6)
    assert ds(list(torch.unbind(stacked, 1)), labels).item() == pytest.approx(want, rel=1e-6)
    # evaluation-mode output (B, C, ...) is one level
    assert ds(stacked[:, 0], labels).item() == pytest.approx(per_level[0], rel=1e-6)
    unnormalised = StackedDeepSupervisionLoss(base, normalize=False)
    assert unnormalised(stacked, labels).item() == pytest.approx(sum(r * v for r, v in zip(raw, per_level)), rel=1e-6)


def test_with_dynunet_deep_supervision():
    from monai.networks.nets import DynUNet

    net = DynUNet(
        3, 1, NUM_CLASSES, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
        filters=[4, 8, 8], res_block=True, deep_supervision=True, deep_supr_num=1,
    )  # fmt: skip
    x = torch.randn(2, 1, 8, 8, 8)
    labels = torch.randint(0, NUM_CLASSES, (2, 1, 8, 8, 8))
    out = net(x)
    assert out.shape == (2, 2, NUM_CLASSES, 8, 8, 8)
    loss = StackedDeepSupervisionLoss(WeightedDiceFocalLoss())(out, labels)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(class_weights=[1.0, -1.0]), ">= 0"),
        (dict(focal_reduction="max"), "focal_reduction"),
        (dict(gamma=-1.0), ">= 0"),
        (dict(dice_mode="mean"), "dice_mode"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(Flare23Error, match=match):
        WeightedDiceFocalLoss(**kwargs)


def test_bad_inputs():
    logits = torch.zeros(1, 3, 2, 2, 2)
    with pytest.raises(Flare23Error, match="2 class weights for 3"):
        WeightedDiceFocalLoss(class_weights=[1, 1])(logits, torch.zeros(1, 1, 2, 2, 2))
    with pytest.raises(Flare23Error, match=r"label values must lie in \[0, 2\]"):
        WeightedDiceFocalLoss()(logits, torch.full((1, 1, 2, 2, 2), 5))
    with pytest.raises(Flare23Error, match="does not match"):
        WeightedDiceFocalLoss()(logits, torch.zeros(1, 1, 2, 2, 3))


def test_class_weights_helper():
    w = class_weights({"7": 2.0, 8: 3})
    assert len(w) == NUM_CLASSES and w[7] == 2.0 and w[8] == 3.0
    assert sum(w) == NUM_CLASSES - 2 + 5.0
    with pytest.raises(Flare23Error, match="outside"):
        class_weights({15: 2.0})
