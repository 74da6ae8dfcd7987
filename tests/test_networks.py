"""``NnDynUNet``: MONAI's DynUNet with nnU-Net's decoder kernels (the kernel of the stage each decoder block outputs to)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import DynUNet

from flare23 import constants
from flare23.models.networks import NnDynUNet, count_parameters

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
STRIDES = {"organ": constants.ORGAN_STRIDES_XYZ, "tumor": constants.TUMOR_STRIDES_XYZ}
FILTERS = (4, 6, 8, 10, 12, 12)


def _net(cls, strides, kernels=constants.KERNELS_XYZ, filters=FILTERS, deep_supervision=True):
    return cls(
        spatial_dims=3,
        in_channels=1,
        out_channels=constants.NUM_CLASSES,
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=filters,
        deep_supervision=deep_supervision,
        deep_supr_num=3,
        res_block=True,
    )


@pytest.mark.parametrize("which", ["organ", "tumor"])
def test_each_decoder_block_uses_the_kernel_of_its_output_stage(which):
    strides, kernels = STRIDES[which], constants.KERNELS_XYZ
    ours, monai = _net(NnDynUNet, strides), _net(DynUNet, strides)
    n = len(kernels)
    assert len(ours.upsamples) == n - 1
    for i, (a, b) in enumerate(zip(ours.upsamples, monai.upsamples)):
        stage = n - 2 - i  # up-blocks run from the bottleneck up; block i writes encoder stage n-2-i's resolution
        for conv in ("conv1", "conv2"):
            shape = tuple(getattr(a.conv_block, conv).conv.weight.shape[2:])
            assert shape == tuple(kernels[stage]), (i, conv, shape)  # nnU-Net's rule
            assert tuple(getattr(b.conv_block, conv).conv.weight.shape[2:]) == tuple(kernels[stage + 1])  # MONAI's
        assert tuple(a.transp_conv.conv.weight.shape[2:]) == tuple(strides[stage + 1])
        assert a.transp_conv.conv.weight.shape == b.transp_conv.conv.weight.shape
    # the only decoder block where the two differ is the full-resolution one: [1,3,3] against [3,3,3]
    assert tuple(ours.upsamples[-1].conv_block.conv1.conv.weight.shape[2:]) == (3, 3, 1)
    # parameters: that block's two convolutions (2 f0 -> f0 and f0 -> f0) lose 27 - 9 = 18 taps each weight
    f0 = FILTERS[0]
    assert count_parameters(monai) - count_parameters(ours) == 18 * (2 * f0 * f0 + f0 * f0)


def test_only_the_kernels_change():
    """With the same kernel everywhere both rules agree: DynUNet's weights load strictly and give the same output."""
    cubic = [(3, 3, 3)] * 6
    strides = STRIDES["organ"]
    torch.manual_seed(0)
    monai = _net(DynUNet, strides, kernels=cubic).eval()
    ours = _net(NnDynUNet, strides, kernels=cubic).eval()
    assert ours.state_dict().keys() == monai.state_dict().keys()
    ours.load_state_dict(monai.state_dict(), strict=True)
    x = torch.randn(1, 1, 64, 64, 32)  # a bottleneck of 2 x 2 x 2 (instance norm needs more than one voxel)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), monai(x), rtol=0, atol=0)
    # with the method's kernels the keys stay the same, but loading a DynUNet checkpoint is refused by shape
    method = _net(NnDynUNet, strides)
    assert method.state_dict().keys() == _net(DynUNet, strides).state_dict().keys()
    with pytest.raises(RuntimeError, match="size mismatch"):
        method.load_state_dict(_net(DynUNet, strides).state_dict())


@pytest.mark.parametrize("which", ["organ", "tumor"])
def test_outputs_and_gradients(which):
    strides = STRIDES[which]
    net = _net(NnDynUNet, strides)
    x = torch.randn(2, 1, 32, 32, 32)
    out = net.train()(x)  # deep supervision: heads stacked on dim 1, all at full size
    assert out.shape == (2, 4, constants.NUM_CLASSES, 32, 32, 32)
    out.square().mean().backward()
    top = net.upsamples[-1].conv_block.conv1.conv.weight.grad
    assert top is not None and torch.isfinite(top).all() and top.abs().sum() > 0
    with torch.no_grad():
        assert net.eval()(x).shape == (2, constants.NUM_CLASSES, 32, 32, 32)
    # the full-resolution decoder block no longer mixes slices: with a kernel of depth 1 in z its
    # convolutions see one slice, as nnU-Net's do
    conv = net.upsamples[-1].conv_block.conv1.conv
    assert conv.kernel_size == (3, 3, 1) and conv.padding == (1, 1, 0)


@pytest.mark.parametrize("bundle", ["organ_seg", "tumor_seg"])
def test_bundle_network_can_be_switched_from_the_command_line(bundle):
    """``--network_def#_target_ flare23.models.networks.NnDynUNet`` builds the bundle's network with nnU-Net's kernels."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "train.json"))
    parser["network_def#_target_"] = "flare23.models.networks.NnDynUNet"
    parser["network_def#filters"] = list(FILTERS)
    parser["device"] = "$torch.device('cpu')"
    net = parser.get_parsed_content("network")
    assert isinstance(net, NnDynUNet)
    assert tuple(net.upsamples[-1].conv_block.conv1.conv.weight.shape[2:]) == tuple(constants.KERNELS_XYZ[0])
