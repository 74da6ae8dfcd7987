"""The light 3D U-Net of the ROI extractor (METHOD.md section 3), batch-norm folding, and
:class:`NnDynUNet`, a ``DynUNet`` whose decoder kernels follow nnU-Net.

:class:`LightUNet` follows the paper's description: an initial conv-BN-ReLU layer, then 5 encoder
stages with ``encoder_depths`` = (2, 2, 4, 6, 4) conv-BN-ReLU blocks (3 x 3 x 3), the first of each
with stride ``strides`` = (1, 2, 2, 2, 2); 4 decoder blocks, each a transposed convolution
(kernel = stride) followed by two conv-BN-ReLU blocks on the concatenation with the skip; a
1 x 1 x 1 convolution gives the logits; "he" normal initialisation. MONAI's ``DynUNet`` cannot
express per-stage encoder depths (each of its stages is exactly one two-convolution block), hence
this small module built from MONAI's ``Convolution`` blocks.

The paper does not give the widths. The default ``ROI_FILTERS`` = (16, 32, 64, 128, 256) give
11.18 M parameters and about 95 G multiply-accumulates on an 80 x 128 x 128 patch (paper:
10.66 M parameters, 103.36 G FLOPs); ``tests/test_roi.py`` recomputes the parameter count.

:func:`fold_batchnorm` returns an inference copy in which every convolution followed by batch
norm is one convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.blocks.dynunet_block import UnetUpBlock
from monai.networks.nets import DynUNet
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from flare23.constants import ROI_ENCODER_DEPTHS, ROI_NUM_CLASSES, ROI_STRIDES
from flare23.errors import Flare23Error

#: Default stage widths of :class:`LightUNet` (11.18 M parameters with the paper's depths).
ROI_FILTERS: tuple[int, ...] = (16, 32, 64, 128, 256)


def _conv_bn_relu(cin: int, cout: int, stride=1) -> Convolution:
    # bias is redundant before batch norm (the norm's shift replaces it)
    return Convolution(3, cin, cout, strides=stride, kernel_size=3, act="RELU", norm="BATCH", bias=False)


class LightUNet(nn.Module):
    """Light 5-stage 3D U-Net with batch norm (the ROI extractor's network).

    Args:
        in_channels: input channels (1: the normalised CT).
        out_channels: output channels (2: background, abdomen).
        filters: width of each stage; ``len(filters)`` stages.
        encoder_depths: conv-BN-ReLU blocks per encoder stage.
        strides: stride of the first block of each stage (an int or a per-axis triple); the input's
            spatial size must be divisible by their product (``RoiInferer`` pads to 16).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = ROI_NUM_CLASSES,
        filters: Sequence[int] = ROI_FILTERS,
        encoder_depths: Sequence[int] = ROI_ENCODER_DEPTHS,
        strides: Sequence[int | Sequence[int]] = ROI_STRIDES,
    ) -> None:
        super().__init__()
        filters, encoder_depths, strides = list(filters), list(encoder_depths), list(strides)
        if not (len(filters) == len(encoder_depths) == len(strides)) or len(filters) < 2:
            raise Flare23Error(
                f"LightUNet: filters {filters}, encoder_depths {encoder_depths} and strides {strides} "
                "must have the same length (at least 2)"
            )
        if min(filters) < 1 or min(encoder_depths) < 1:
            raise Flare23Error(f"LightUNet: filters {filters} and encoder_depths {encoder_depths} must be positive")
        self.filters, self.encoder_depths, self.strides = tuple(filters), tuple(encoder_depths), tuple(strides)
        self.stem = _conv_bn_relu(in_channels, filters[0])
        self.encoder = nn.ModuleList()
        cin = filters[0]
        for width, depth, stride in zip(filters, encoder_depths, strides):
            blocks = [_conv_bn_relu(cin, width, stride)] + [_conv_bn_relu(width, width) for _ in range(depth - 1)]
            self.encoder.append(nn.Sequential(*blocks))
            cin = width
        self.upsamples = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in reversed(range(len(filters) - 1)):
            stride = strides[i + 1]
            self.upsamples.append(
                Convolution(
                    3,
                    filters[i + 1],
                    filters[i],
                    strides=stride,
                    kernel_size=stride,
                    padding=0,
                    output_padding=0,
                    conv_only=True,
                    is_transposed=True,
                )
            )
            self.decoder.append(nn.Sequential(_conv_bn_relu(2 * filters[i], filters[i]), _conv_bn_relu(filters[i], filters[i])))
        self.head = Convolution(3, filters[0], out_channels, kernel_size=1, conv_only=True)
        for m in self.modules():  # "he" normal initialisation (paper, table 2; nnU-Net's InitWeights_He)
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, a=1e-2)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.upsamples, self.decoder):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


class NativeHeadsDynUNet(DynUNet):
    """MONAI ``DynUNet`` whose deep-supervision outputs keep their own resolution (same arguments, same weights).

    In training mode with ``deep_supervision``, MONAI's ``DynUNet`` upsamples every head to the full
    patch size and stacks them (``(B, L, C, ...)``), so the loss is computed ``L`` times at full
    resolution. nnU-Net instead compares each head with the reference downsampled to the head's size.
    This class returns ``[full-resolution logits, head 1, head 2, ...]``, each at its own size, and
    :class:`flare23.models.losses.StackedDeepSupervisionLoss` (MONAI's ``DeepSupervisionLoss``)
    downsamples the reference to each (``nearest-exact``, as nnU-Net). The level-0 output and every
    weight are DynUNet's; only the deep-supervision terms see nnU-Net's targets instead of
    nearest-upsampled heads. A CPU training step of the CPU runs' network (widths 8-64, 64 x 64 x 32,
    batch 2, one thread, the bundle's loss) takes 1.31 s instead of 2.07 s with the organ strides (1.58x)
    and 1.53 s instead of 2.08 s with the tumor strides (1.36x; ``bench/bench_network.py --compare
    heads``): most of the 1.8x more iterations that nnU-Net made in the same budget
    (``bench/bench_training.py``, issue 24).

    Evaluation mode, and TorchScript (which cannot script DynUNet's heads anyway), return DynUNet's
    output unchanged, so inference, export and the state-dict keys are DynUNet's.
    """

    def forward(self, x):
        out = self.output_block(self.skip_layers(x))
        if not torch.jit.is_scripting() and self.training and self.deep_supervision:
            return [out] + list(self.heads)
        return out


class NnDynUNet(NativeHeadsDynUNet):
    """:class:`NativeHeadsDynUNet` with nnU-Net's decoder kernels (same arguments, same module names).

    nnU-Net's decoder merges the skip of encoder stage ``s`` with convolutions of that stage's
    kernel (``dynamic_network_architectures``' ``UNetDecoder`` takes ``kernel_sizes[-(s + 1)]``).
    MONAI 1.6.1's ``DynUNet.get_upsamples`` takes ``kernel_size[1:]`` instead, i.e. the kernel of
    the stage *below*: with the method's kernels ([1,3,3], then [3,3,3]) the full-resolution decoder
    block convolves with 3 x 3 x 3 where nnU-Net (and the paper's network) uses 1 x 3 x 3. A CPU
    training step of the phantom runs' network (widths 8-64, 64 x 64 x 32) is 1.10x faster with
    nnU-Net's kernel (``bench/bench_network.py``); the point is fidelity.

    Only the kernel of each up-block's convolutions changes; strides, transposed convolutions,
    widths, deep supervision and the state-dict keys are DynUNet's (``tests/test_networks.py``).
    Checkpoints are not interchangeable with ``DynUNet`` when the first two kernels differ (the
    full-resolution decoder's weights have another shape; ``load_state_dict`` reports the size
    mismatch).
    """

    def get_upsamples(self):
        inp, out = self.filters[1:][::-1], self.filters[:-1][::-1]
        strides, kernel_size = self.strides[1:][::-1], self.kernel_size[:-1][::-1]
        return self.get_module_list(
            inp,
            out,
            kernel_size,
            strides,
            UnetUpBlock,
            self.upsample_kernel_size[::-1],
            trans_bias=self.trans_bias,
        )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` where every convolution directly followed by batch norm is one convolution.

    Handles MONAI ``Convolution`` blocks (conv + ``adn.N``) and plain ``nn.Sequential`` pairs
    (``Conv3d`` then ``BatchNorm3d``). The input module is not changed.
    """
    folded = copy.deepcopy(module).eval()
    for sub in folded.modules():
        if (
            isinstance(sub, Convolution)
            and hasattr(sub, "adn")
            and isinstance(getattr(sub.adn, "N", None), nn.modules.batchnorm._BatchNorm)
        ):
            if isinstance(sub.conv, nn.modules.conv._ConvNd) and not sub.is_transposed:
                sub.conv = fuse_conv_bn_eval(sub.conv, sub.adn.N)
                sub.adn.N = nn.Identity()
        elif isinstance(sub, nn.Sequential):
            names = list(sub._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = sub._modules[a], sub._modules[b]
                if (
                    isinstance(conv, nn.modules.conv._ConvNd)
                    and not getattr(conv, "transposed", False)
                    and isinstance(bn, nn.modules.batchnorm._BatchNorm)
                ):
                    sub._modules[a] = fuse_conv_bn_eval(conv, bn)
                    sub._modules[b] = nn.Identity()
    return folded
