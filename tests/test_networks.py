"""``NnDynUNet``: MONAI's DynUNet with nnU-Net's decoder kernels (the kernel of the stage each decoder block outputs to)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import DynUNet

from flare23 import constants
from flare23.models.networks import NativeHeadsDynUNet, NnDynUNet, count_parameters

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
    """Training output: 4 levels, each head at its own stage's size (not upsampled); gradients reach the top."""
    strides = STRIDES[which]
    net = _net(NnDynUNet, strides)
    x = torch.randn(2, 1, 32, 32, 32)
    out = net.train()(x)  # deep supervision: full resolution first, then each head at its own size
    expected = [tuple(32 // int(s) for s in strides[0])]  # stage k's size: the input over the strides up to k
    for stride in strides[1 : len(out)]:
        expected.append(tuple(a // int(s) for a, s in zip(expected[-1], stride)))
    assert [tuple(o.shape) for o in out] == [(2, constants.NUM_CLASSES, *e) for e in expected]
    sum(o.square().mean() for o in out).backward()
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


@pytest.mark.parametrize("which", ["organ", "tumor"])
def test_native_heads_are_dynunets_heads_before_upsampling(which):
    """``NativeHeadsDynUNet`` returns DynUNet's level-0 output and its heads at their own size; the same weights."""
    strides = STRIDES[which]
    torch.manual_seed(1)
    monai = _net(DynUNet, strides).train()
    ours = _net(NativeHeadsDynUNet, strides).train()
    ours.load_state_dict(monai.state_dict(), strict=True)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        stacked, levels = monai(x), ours(x)
    assert isinstance(levels, list) and len(levels) == stacked.shape[1] == 4
    torch.testing.assert_close(levels[0], stacked[:, 0], rtol=0, atol=0)
    for k, head in enumerate(levels[1:], start=1):
        assert head.shape[2:] != stacked.shape[3:]  # not upsampled
        # DynUNet's stacked head is the same head upsampled by nearest neighbour
        up = torch.nn.functional.interpolate(head, size=stacked.shape[3:])
        torch.testing.assert_close(up, stacked[:, k], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), monai.eval()(x), rtol=0, atol=0)


def test_native_heads_loss_compares_each_head_with_the_downsampled_reference():
    """The deep-supervision loss of the list output = sum of w_k * loss(head_k, nearest-exact downsampled reference)."""
    from flare23.models.losses import StackedDeepSupervisionLoss, WeightedDiceFocalLoss

    strides = STRIDES["organ"]
    torch.manual_seed(2)
    net = _net(NativeHeadsDynUNet, strides).train()
    x = torch.randn(1, 1, 32, 32, 32)
    y = torch.randint(0, constants.NUM_CLASSES, (1, 1, 32, 32, 32)).float()
    base = WeightedDiceFocalLoss(dice_mode="per_class")
    levels = net(x)
    got = StackedDeepSupervisionLoss(base)(levels, y)
    weights = [0.5**k for k in range(len(levels))]
    want = 0.0
    for w, out in zip(weights, levels):
        # independent downsampling: take the reference voxel nearest each head voxel's centre
        idx = [((torch.arange(n) + 0.5) * (m / n)).floor().long() for n, m in zip(out.shape[2:], y.shape[2:])]
        ref = y[:, :, idx[0]][:, :, :, idx[1]][:, :, :, :, idx[2]]
        want = want + w * base(out, ref)
    torch.testing.assert_close(got, want / sum(weights))
    torch.testing.assert_close(StackedDeepSupervisionLoss(base)(levels, y.long()), got)  # an integer label map too


@pytest.mark.parametrize("bundle", ["organ_seg", "tumor_seg"])
def test_bundles_train_with_native_heads(bundle):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "train.json"))
    parser["network_def#filters"] = list(FILTERS)
    parser["device"] = "$torch.device('cpu')"
    assert type(parser.get_parsed_content("network")) is NativeHeadsDynUNet
