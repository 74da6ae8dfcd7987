"""The paper's weighted compound loss (eq. 1-4) and its deep-supervision wrapper.

:class:`WeightedDiceFocalLoss` is ``L = l_d + lambda * l_f`` on softmax probabilities ``p`` and a
one-hot reference ``g`` (METHOD.md section 4, paper eq. 1-4):

* ``l_d = -(2 * sum_c w_c sum_b p_b^c g_b^c + smooth) / (sum_c sum_b (p_b^c + g_b^c) + smooth)``
  (eq. 2): one ratio over all Dice classes and all voxels of the batch ("batch Dice"), the class
  weights in the numerator only, the background excluded by default. Negative, as in the paper
  and nnU-Net (``-1`` for a perfect prediction with unit weights).
* ``l_f = -sum_c alpha w_c sum_b (1 - p_t)^gamma log(p_t)`` with ``p_t = p`` where ``g = 1`` and
  ``1 - p`` where ``g = 0`` (eq. 3-4): a per-class binary focal term on the *softmax*
  probabilities, over all channels including the background (it generalises the cross-entropy
  that nnU-Net pairs with Dice).

**Option (Dice aggregation).** ``dice_mode="global"`` (default) is eq. 2 as printed and as
METHOD.md states it: one ratio, so every voxel weighs the same and a class's pull grows with its
size. ``dice_mode="per_class"`` is what the paper's public code computes (nnU-Net's batch soft
Dice per class, ``d_c = (2 sum_b p g + smooth) / (sum_b (p + g) + smooth)``, weighted by ``w_c``);
here the weighted sum is divided by ``sum_c w_c``, so unit weights give nnU-Net's mean Dice (the
public code sums and clips the gradient norm at 12 instead). Small classes learn much sooner with
``per_class``.

**Decision (focal normalisation).** Eq. 3 sums over voxels, which makes the focal term grow with
the patch size (about 10^6 times the Dice term for a 64 x 128 x 224 patch) and ties the learning
rate to the patch size. ``focal_reduction="mean"`` (default) divides the voxel sum by the number
of voxels ``B * X * Y * Z`` (the usual focal-loss reduction, nnU-Net's cross-entropy reduction);
``"sum"`` is the literal equation.

Why not MONAI's ``DiceFocalLoss``: its focal term is sigmoid-based (``FocalLoss`` with
``use_softmax=False``, the default that ``DiceFocalLoss`` keeps even when ``softmax=True`` is given
for the Dice part), and its Dice loss averages per-class terms ``w_c (1 - Dice_c)`` instead of
eq. 2's single ratio with the weights in the numerator only; so it is a different loss, hence this
component.

:class:`StackedDeepSupervisionLoss` wraps any loss for MONAI's ``DynUNet`` trained with deep
supervision, whose training output is one stacked tensor ``(B, L, C, ...)``: it unbinds the level
axis and sums the per-level losses with weights halving per level, normalised to sum to 1 (as
nnU-Net). In evaluation mode ``DynUNet`` returns ``(B, C, ...)``, which is passed straight through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss
from monai.networks.utils import one_hot
from torch.nn.modules.loss import _Loss

from flare23.constants import NUM_CLASSES
from flare23.errors import Flare23Error

__all__ = ["WeightedDiceFocalLoss", "StackedDeepSupervisionLoss", "class_weights"]


def class_weights(upweighted: Mapping[int | str, float] | None = None, num_classes: int = NUM_CLASSES) -> list[float]:
    """Loss weights: 1 for every class except ``{label: weight}`` of ``upweighted`` (JSON keys may be strings).

    ``class_weights({14: 2.0})`` is the tumor model's setting; ``class_weights({7: 2, 8: 2, 9: 2, 10: 2})``
    the organ model's (adrenal glands, gallbladder, esophagus: the smallest organs).
    """
    weights = [1.0] * int(num_classes)
    for key, value in (upweighted or {}).items():
        try:
            label, weight = int(key), float(value)
        except (TypeError, ValueError):
            raise Flare23Error(f"class weights: expected {{label: weight}} numbers, got {key!r}: {value!r}") from None
        if not 0 <= label < num_classes:
            raise Flare23Error(f"class weights: label {label} is outside [0, {num_classes - 1}]")
        weights[label] = weight
    return weights


class WeightedDiceFocalLoss(_Loss):
    """Class-weighted soft Dice + ``lambda_focal`` x class-weighted softmax focal loss (paper eq. 1-4).

    Args:
        class_weights: one weight per output channel (15 for the fine models: background, 13 organs,
            tumor); ``None`` gives 1 for every channel. The background weight only enters the focal
            term unless ``include_background`` is true.
        lambda_focal: ``lambda`` of eq. 1.
        gamma: focusing exponent of eq. 3.
        alpha: global focal factor of eq. 3.
        smooth: added to the numerator and denominator of eq. 2.
        include_background: include channel 0 in the Dice term (eq. 2); the focal term always
            covers every channel.
        focal_reduction: ``"mean"`` (voxel sum divided by the number of voxels in the batch) or
            ``"sum"`` (the literal eq. 3); see the module docstring.
        dice_mode: ``"global"`` (eq. 2: one weighted ratio) or ``"per_class"`` (weighted mean of
            per-class batch Dice ratios, the public code's form); see the module docstring.

    ``forward(input, target)``: ``input`` are logits ``(B, C, ...)``; ``target`` is a label map
    ``(B, 1, ...)`` with values in ``[0, C)`` or a one-hot tensor ``(B, C, ...)``.
    """

    def __init__(
        self,
        class_weights: Sequence[float] | None = None,
        lambda_focal: float = 1.0,
        gamma: float = 2.0,
        alpha: float = 1.0,
        smooth: float = 1e-5,
        include_background: bool = False,
        focal_reduction: str = "mean",
        dice_mode: str = "global",
    ) -> None:
        super().__init__()
        if class_weights is not None:
            weights = torch.as_tensor([float(w) for w in class_weights], dtype=torch.float64)
            if weights.ndim != 1 or weights.numel() < 2:
                raise Flare23Error(f"class_weights: expected one weight per class, got {list(class_weights)}")
            if not torch.all(torch.isfinite(weights)) or torch.any(weights < 0):
                raise Flare23Error(f"class_weights: weights must be finite and >= 0, got {weights.tolist()}")
            self.register_buffer("class_weights", weights)
        else:
            self.class_weights = None
        if dice_mode not in ("global", "per_class"):
            raise Flare23Error(f"dice_mode: expected 'global' or 'per_class', got {dice_mode!r}")
        if focal_reduction not in ("mean", "sum"):
            raise Flare23Error(f"focal_reduction: expected 'mean' or 'sum', got {focal_reduction!r}")
        if gamma < 0 or alpha < 0 or lambda_focal < 0 or smooth < 0:
            raise Flare23Error(
                f"loss parameters must be >= 0 (gamma={gamma}, alpha={alpha}, lambda_focal={lambda_focal}, smooth={smooth})"
            )
        self.lambda_focal = float(lambda_focal)
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.smooth = float(smooth)
        self.include_background = bool(include_background)
        self.focal_reduction = focal_reduction
        self.dice_mode = dice_mode

    def _one_hot(self, target: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        num_classes = shape[1]
        if target.ndim != len(shape) or target.shape[0] != shape[0] or target.shape[2:] != shape[2:]:
            raise Flare23Error(f"loss: target shape {tuple(target.shape)} does not match the prediction shape {tuple(shape)}")
        if target.shape[1] == num_classes and num_classes > 1:
            return target.float()
        if target.shape[1] != 1:
            raise Flare23Error(f"loss: target has {target.shape[1]} channels, expected 1 (label map) or {num_classes} (one-hot)")
        labels = target.long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise Flare23Error(
                f"loss: label values must lie in [0, {num_classes - 1}], got [{int(labels.min())}, {int(labels.max())}]"
            )
        return one_hot(labels, num_classes=num_classes, dim=1, dtype=torch.float32)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.ndim < 3:
            raise Flare23Error(f"loss: expected logits (B, C, spatial...), got shape {tuple(input.shape)}")
        logits = input if input.dtype == torch.float64 else input.float()
        num_classes = logits.shape[1]
        g = self._one_hot(target, logits.shape).to(device=logits.device, dtype=logits.dtype)
        if self.class_weights is None:
            w = torch.ones(num_classes, dtype=logits.dtype, device=logits.device)
        else:
            if self.class_weights.numel() != num_classes:
                raise Flare23Error(f"loss: {self.class_weights.numel()} class weights for {num_classes} output channels")
            w = self.class_weights.to(device=logits.device, dtype=logits.dtype)

        log_p = F.log_softmax(logits, dim=1)
        p = log_p.exp()
        sum_axes = [0] + list(range(2, logits.ndim))  # batch and voxels: the sums over b

        # eq. 2: one weighted Dice ratio over the Dice classes
        first = 0 if self.include_background else 1
        intersection = (p[:, first:] * g[:, first:]).sum(dim=sum_axes)
        totals = (p[:, first:] + g[:, first:]).sum(dim=sum_axes)
        if self.dice_mode == "global":
            l_d = -(2.0 * (w[first:] * intersection).sum() + self.smooth) / (totals.sum() + self.smooth)
        else:  # per class, weighted mean
            dice = (2.0 * intersection + self.smooth) / (totals + self.smooth)
            l_d = -(w[first:] * dice).sum() / w[first:].sum().clamp_min(torch.finfo(w.dtype).tiny)

        # eq. 3-4: log(1 - p) from log p without cancellation; clamped so the gradient stays finite
        tiny = torch.finfo(logits.dtype).tiny
        log_1mp = torch.log((-torch.expm1(log_p)).clamp_min(tiny))
        is_ref = g > 0.5
        log_pt = torch.where(is_ref, log_p, log_1mp)
        one_minus_pt = torch.where(is_ref, 1.0 - p, p).clamp_min(0.0)
        per_class = (one_minus_pt.pow(self.gamma) * log_pt).sum(dim=sum_axes)
        l_f = -self.alpha * (w * per_class).sum()
        if self.focal_reduction == "mean":
            l_f = l_f / float(g[:, 0].numel())
        return l_d + self.lambda_focal * l_f


class StackedDeepSupervisionLoss(DeepSupervisionLoss):
    """``monai.losses.DeepSupervisionLoss`` that also accepts ``DynUNet``'s stacked training output.

    A tensor with one dimension more than the target, ``(B, L, C, ...)``, is unbound along ``L``
    (level 0 = full resolution); a list or tuple is used as is; a plain ``(B, C, ...)`` tensor is
    one level. A level smaller than the target (``flare23.models.networks.NativeHeadsDynUNet``'s heads)
    is compared with the target downsampled to its size (MONAI's ``nearest-exact``, as nnU-Net; an
    integer label map is taken as float for that). Weights default to halving per level
    (``weight_mode="exp"``) and, with ``normalize=True``, are divided by their sum over the levels
    present, as nnU-Net does.
    """

    def __init__(
        self, loss: _Loss, weight_mode: str = "exp", weights: Sequence[float] | None = None, normalize: bool = True
    ) -> None:
        super().__init__(loss, weight_mode=weight_mode, weights=None if weights is None else [float(x) for x in weights])
        self.normalize = bool(normalize)

    def get_weights(self, levels: int = 1) -> list[float]:
        weights = super().get_weights(levels)
        if self.normalize:
            total = float(sum(weights))
            if total <= 0:
                raise Flare23Error(f"deep supervision weights must have a positive sum, got {weights}")
            weights = [x / total for x in weights]
        return weights

    def forward(self, input, target: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.Tensor) and input.ndim == target.ndim + 1:
            input = list(torch.unbind(input, dim=1))
        if isinstance(input, torch.Tensor):
            input = [input]
        if not torch.is_floating_point(target) and any(x.shape[2:] != target.shape[2:] for x in input):
            target = target.float()  # nearest-exact downsampling needs floats; label values stay exact
        return super().forward(input, target)
