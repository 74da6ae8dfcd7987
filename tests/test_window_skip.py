"""Skipping sliding windows (issue 23 item 3): the skipped-window arithmetic, the air and tumor-host rules, the cascade.

Expected values are computed independently: window contributions by hand from MONAI's Gaussian, the
windows a rule must run from the model-grid input itself (an indicator resampled with ``F.interpolate``,
a dilation with scipy), and the cascade against its own run with the options off.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map
from scipy import ndimage

from flare23.errors import Flare23Error
from flare23.inference.branches import Branch, CascadeNetworks
from flare23.inference.cascade import CascadeInferer
from flare23.inference.skipping import (
    TUMOR_HOST_IDS,
    WindowCounter,
    body_mask,
    crop_box,
    host_mask,
    margin_voxels,
    window_key,
    window_plan,
)
from flare23.inference.sliding import sliding_window_slabs, window_slices

torch.set_num_threads(1)


def _net(channels_out=3, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d(1, channels_out, 3, padding=1)
    return lambda x: torch.softmax(conv(x), 1)


def _whole(slabs, axis):
    return torch.cat([s[2] for s in slabs], dim=1 + axis % 3)


# --- sliding window with a predicate ---------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, roi, overlap, axis, batch",
    [((20, 17, 30), (8, 8, 8), 0.5, 2, 1), ((20, 17, 30), (8, 6, 10), 0.2, 0, 3), ((5, 17, 9), (8, 8, 4), 0.5, 2, 2)],
)
def test_a_predicate_that_runs_every_window_changes_nothing(shape, roi, overlap, axis, batch):
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    net = _net()
    seen = []

    def everything(w):
        seen.append(w)
        return True

    with torch.inference_mode():
        ref = _whole(sliding_window_slabs(x, net, roi, overlap, axis=axis, sw_batch_size=batch, cval=-1.5), axis)
        got = _whole(sliding_window_slabs(x, net, roi, overlap, axis=axis, sw_batch_size=batch, cval=-1.5,
                                          run_window=everything, skip_probs=(1.0, 0.0, 0.0)), axis)  # fmt: skip
    assert torch.equal(got, ref)
    # asked once per window, with the windows of window_slices (clipped to the unpadded image)
    assert sorted(window_key(w) for w in seen) == sorted(window_key(w) for w in window_slices(shape, roi, overlap))
    assert all(0 <= s.start < s.stop <= n for w in seen for s, n in zip(w, shape))


def test_a_skipped_window_counts_as_certain_background_by_hand():
    # two windows along z: [0, 8) and [4, 12); the second is skipped
    shape, roi = (4, 4, 12), (4, 4, 8)
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(3))
    net = _net(channels_out=3, seed=5)
    assert [window_key(w) for w in window_slices(shape, roi, 0.5)] == [(0, 0, 0), (0, 0, 4)]
    with torch.inference_mode():
        got = _whole(sliding_window_slabs(x, net, roi, 0.5, axis=2, run_window=lambda w: w[2].start == 0,
                                          skip_probs=(1.0, 0.0, 0.0)), 2)  # fmt: skip
        p = net(x[..., 0:8])[0]  # the run window's answer
    g = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125, device="cpu")
    bg = torch.zeros_like(p)
    bg[0] = 1.0
    expected = torch.empty(3, *shape)
    expected[..., 0:4] = p[..., 0:4]  # covered by the run window only: its answer
    w0, w1 = g[..., 4:8], g[..., 0:4]  # the overlap: the run window's weights and the skipped one's
    expected[..., 4:8] = (w0 * p[..., 4:8] + w1 * bg[..., 0:4]) / (w0 + w1)
    expected[..., 8:12] = bg[..., 4:8]  # covered by the skipped window only: background
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_all_windows_skipped_and_a_missing_skip_answer():
    x = torch.randn(1, 1, 10, 10, 10)
    calls = []

    def net(v):
        calls.append(v)
        return torch.softmax(torch.randn(v.shape[0], 4, *v.shape[2:]), 1)

    got = _whole(sliding_window_slabs(x, net, (6, 6, 6), 0.5, run_window=lambda w: False, skip_probs=(0.0, 1.0, 0.0, 0.0)), 2)
    assert not calls and got.shape == (4, 10, 10, 10)
    assert torch.equal(got, F.one_hot(torch.ones(10, 10, 10, dtype=torch.long), 4).permute(3, 0, 1, 2).float())
    with pytest.raises(ValueError, match="skip_probs"):
        list(sliding_window_slabs(x, net, (6, 6, 6), 0.5, run_window=lambda w: False))


# --- the rules -------------------------------------------------------------------------------------
def _reads(indicator: torch.Tensor, model_shape) -> torch.Tensor:
    """Model-grid voxels whose trilinear interpolation reads a true crop voxel (independently of crop_box)."""
    v = F.interpolate(indicator.float()[None, None], size=tuple(model_shape), mode="trilinear", align_corners=False)[0, 0]
    return v > 0


@pytest.mark.parametrize("model_shape", [(13, 9, 7), (40, 30, 20), (25, 17, 5)])
def test_crop_box_is_exactly_what_the_resampling_reads(model_shape):
    crop_shape = (25, 17, 11)
    g = torch.Generator().manual_seed(sum(model_shape))
    for _ in range(20):
        lo = [int(torch.randint(0, m, (1,), generator=g)) for m in model_shape]
        hi = [int(torch.randint(a + 1, m + 1, (1,), generator=g)) for a, m in zip(lo, model_shape)]
        window = tuple(slice(a, b) for a, b in zip(lo, hi))
        box = crop_box(window, model_shape, crop_shape)
        inside = torch.zeros(crop_shape, dtype=torch.bool)
        inside[box] = True
        reads = _reads(inside, model_shape)[window]
        assert bool(reads.all())  # every model voxel of the window reads the box
        # and every crop voxel of the box is read by some voxel of the window (the box is not too large)
        for axis in range(3):
            for edge in (box[axis].start, box[axis].stop - 1):
                one = torch.zeros(crop_shape, dtype=torch.bool)
                sl = list(box)
                sl[axis] = slice(edge, edge + 1)
                one[tuple(sl)] = True
                assert bool(_reads(one, model_shape)[window].any()), (window, box, axis, edge)


def _body_phantom(shape=(40, 36, 24), seed=0):
    """HU: air (-1000) with an off-centre body ellipsoid (soft tissue 40 HU, fat -100 at its rim, a -900 gas pocket)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    c = np.array([14.0, 15.0, 10.0])[:, None, None, None]
    r = np.array([10.0, 9.0, 7.0])[:, None, None, None]
    d = np.sqrt((((grid - c) / r) ** 2).sum(0))
    hu = np.full(shape, -1000.0)
    hu[d < 1.0] = -100.0
    hu[d < 0.8] = 40.0 + rng.normal(0, 10, size=int((d < 0.8).sum()))
    hu[(np.abs(grid[0] - 14) < 2) & (np.abs(grid[1] - 15) < 2) & (np.abs(grid[2] - 10) < 2)] = -900.0
    hu[0, 0, 0] = -499.0  # just above the threshold: body (an isolated voxel still counts)
    return torch.from_numpy(hu.astype(np.float32))


@pytest.mark.parametrize("model_shape, roi, overlap", [((40, 36, 24), (8, 8, 6), 0.5), ((30, 50, 12), (10, 12, 4), 0.25)])
def test_the_air_rule_skips_exactly_the_windows_without_a_body_voxel(model_shape, roi, overlap):
    hu = _body_phantom()
    plan = window_plan(body_mask(hu), model_shape, roi, overlap)
    body_on_model = _reads(hu > -500.0, model_shape)
    expected = {window_key(w): bool(body_on_model[w].any()) for w in window_slices(model_shape, roi, overlap)}
    assert plan == expected
    assert 0 < sum(plan.values()) < len(plan)  # both kinds occur: the test could fail either way


def test_the_body_is_decided_from_hu_not_from_the_normalised_input():
    hu = torch.full((10, 10, 10), -1000.0)
    hu[5, 5, 5] = -300.0  # lung-like tissue: below a fingerprint's clip_low of fat, still body
    plan = window_plan(body_mask(hu), (10, 10, 10), (4, 4, 4), 0.0)
    assert [k for k, v in plan.items() if v] == [(4, 4, 4)]


@pytest.mark.parametrize("margin_mm", [0.0, 7.0, 12.5])
def test_the_host_rule_runs_the_windows_near_hosts_or_tumor_and_no_others(margin_mm):
    spacing = (2.0, 2.0, 5.0)
    labels = torch.zeros((40, 36, 20), dtype=torch.uint8)
    labels[3:6, 4:9, 2:4] = 1  # liver
    labels[30:33, 28:30, 15:17] = 5  # aorta: not a host
    labels[20, 30, 8] = 14  # the organ model's tumor
    labels[34:36, 3:5, 10:12] = 13  # left kidney
    model_shape, roi, overlap = (32, 30, 30), (8, 8, 6), 0.25
    grow = margin_voxels(margin_mm, spacing)
    plan = window_plan(host_mask(labels), model_shape, roi, overlap, grow=grow)
    # independently: the host mask dilated by a box of +-margin mm, then what each window's input reads
    hosts = np.isin(labels.numpy(), [1, 2, 3, 4, 9, 11, 12, 13, 14])
    size = [2 * int(np.floor(margin_mm / s + 1e-6)) + 1 for s in spacing]
    dilated = ndimage.binary_dilation(hosts, structure=np.ones(size, bool)) if margin_mm else hosts
    near = _reads(torch.from_numpy(dilated), model_shape)
    expected = {window_key(w): bool(near[w].any()) for w in window_slices(model_shape, roi, overlap)}
    assert plan == expected
    assert 0 < sum(plan.values()) < len(plan)
    # aorta alone would run nothing
    aorta = torch.where(labels == 5, labels, torch.zeros_like(labels))
    assert not any(window_plan(host_mask(aorta), model_shape, roi, overlap, grow=grow).values())


def test_host_ids_and_margins():
    assert set(TUMOR_HOST_IDS) == {1, 2, 3, 4, 9, 11, 12, 13}  # liver, kidneys, spleen, pancreas, gallbladder, stomach, duodenum
    assert margin_voxels(10.0, (0.8, 2.5, 5.0)) == (12, 4, 2)
    assert margin_voxels(5.0, (2.5, 5.0, 6.0)) == (2, 1, 0)  # a voxel exactly at the margin is within it


def test_window_counter_counts_what_it_decides():
    plan = {(0, 0, 0): True, (0, 0, 4): False}
    c = WindowCounter(plan)
    assert c((slice(0, 8),) * 3) and not c((slice(0, 8), slice(0, 8), slice(4, 12)))
    assert (c.run, c.skipped, c.skips) == (1, 1, True)
    everything = WindowCounter()
    assert everything((slice(0, 1),) * 3) and (everything.run, everything.skipped, everything.skips) == (1, 0, False)


# --- the cascade -----------------------------------------------------------------------------------
class _Const(torch.nn.Module):
    """Constant logits: channel ``hot`` wins everywhere; counts the windows it is given."""

    def __init__(self, channels: int, hot: int):
        super().__init__()
        self.channels, self.hot, self.windows = channels, hot, 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.windows += x.shape[0]
        out = torch.zeros((x.shape[0], self.channels, *x.shape[2:]), dtype=x.dtype, device=x.device)
        out[:, self.hot] = 8.0
        return out + 0 * self.dummy


class _Organs(torch.nn.Module):
    """Label ``hot`` (liver by default) where the normalised input exceeds ``t``, background elsewhere (soft logits)."""

    def __init__(self, t: float, hot: int = 1):
        super().__init__()
        self.t, self.hot, self.windows = t, hot, 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.windows += x.shape[0]
        out = torch.full((x.shape[0], 15, *x.shape[2:]), -30.0, dtype=x.dtype, device=x.device)
        out[:, 0] = 0.0
        out[:, self.hot] = 20.0 * (x[:, 0] - self.t)
        return out + 0 * self.dummy


def _branch(name, spacing, patch=(8, 8, 6), overlap=0.25) -> Branch:
    return Branch(name=name, target_spacing=spacing, patch_size=patch, overlap=overlap, clip_low=-1000.0, clip_high=1000.0,
                  mean=0.0, std=100.0)  # fmt: skip


def _whole_box(monkeypatch):
    from flare23.inference import cascade
    from flare23.roi.box import RoiBox

    monkeypatch.setattr(cascade, "locate", lambda roi, image, affine, **k: RoiBox((0, 0, 0), tuple(image.shape), tuple(image.shape)))


def _segment(hu: torch.Tensor, organ_net, tumor_net, **options):
    from monai.data import MetaTensor

    affine = np.diag([3.0, 3.0, 4.0, 1.0])
    inferer = CascadeInferer(tumor=_branch("tumor", (4.0, 4.0, 6.0)), organ=_branch("organ", (3.0, 3.0, 5.0)),
                             precision="fp32", postprocessing=False, **options)  # fmt: skip
    nets = CascadeNetworks(roi=_Const(2, 1), organ=organ_net, tumor=tumor_net).eval()
    x = MetaTensor(hu[None, None].to(torch.int16), affine=torch.as_tensor(affine))
    out = inferer(x, nets)[0, 0]
    return out, inferer


def test_options_on_give_the_full_run_where_a_host_and_the_body_are_everywhere(monkeypatch):
    _whole_box(monkeypatch)
    hu = 60.0 + 80.0 * torch.rand((40, 36, 24), generator=torch.Generator().manual_seed(0))  # body everywhere, above -500
    off, inf_off = _segment(hu, _Organs(1.0), _Const(15, 14))
    on, inf_on = _segment(hu, _Organs(1.0), _Const(15, 14), skip_air_windows=True, tumor_windows="hosts", tumor_host_margin_mm=0.0)
    assert int((off == 14).sum()) > 0
    assert torch.equal(on, off)
    assert inf_on.window_counts == inf_off.window_counts  # every window ran in both
    c = inf_on.window_counts[-1]
    assert c["organ_windows_skipped"] == 0 and c["tumor_windows_skipped"] == 0 and c["organ_windows_run"] > 1


def test_air_windows_are_skipped_and_the_labels_kept(monkeypatch):
    _whole_box(monkeypatch)
    hu = _body_phantom()
    hu[hu > 0] = 160.0  # the tissue core: liver for _Organs(1.0)
    organ_off, tumor_off = _Organs(1.0), _Organs(1.0, hot=14)
    off, inf_off = _segment(hu, organ_off, tumor_off)
    organ_on, tumor_on = _Organs(1.0), _Organs(1.0, hot=14)
    on, inf_on = _segment(hu, organ_on, tumor_on, skip_air_windows=True)
    c_off, c_on = inf_off.window_counts[-1], inf_on.window_counts[-1]
    for part, net_off, net_on in (("organ", organ_off, organ_on), ("tumor", tumor_off, tumor_on)):
        total = c_off[f"{part}_windows_run"]
        assert c_off[f"{part}_windows_skipped"] == 0 and net_off.windows == total
        assert c_on[f"{part}_windows_skipped"] > 0 and c_on[f"{part}_windows_run"] + c_on[f"{part}_windows_skipped"] == total
        assert net_on.windows == c_on[f"{part}_windows_run"]  # the network saw exactly the windows counted as run
    assert int((off == 14).sum()) > 0 and torch.equal(on, off)  # air: the networks answered background there anyway


def test_the_tumor_model_runs_only_near_hosts_and_its_tumor_stays_there(monkeypatch):
    _whole_box(monkeypatch)
    hu = torch.full((48, 40, 24), 40.0)
    hu[4:10, 4:10, 3:7] = 160.0  # a small liver in one corner; the rest soft tissue that no model labels
    tumor_net = _Const(15, 14)  # "tumor" everywhere it runs
    margin = 12.0  # 4 voxels in x and y, 3 in z at 3 x 3 x 4 mm
    on, inf = _segment(hu, _Organs(1.0), tumor_net, tumor_windows="hosts", tumor_host_margin_mm=margin)
    off, _ = _segment(hu, _Organs(1.0), _Const(15, 14))
    c = inf.window_counts[-1]
    assert c["tumor_windows_skipped"] > 0 and tumor_net.windows == c["tumor_windows_run"]
    assert c["organ_windows_skipped"] == 0  # the organ model runs everywhere without skip_air_windows
    assert bool((off == 14).all())  # the full run: tumor everywhere
    # tumor on every voxel near the liver: all the windows it is interpolated from touch the dilated liver
    liver = np.zeros(hu.shape, bool)
    liver[4:10, 4:10, 3:7] = True
    near = ndimage.binary_dilation(liver, structure=np.ones((5, 5, 3), bool))
    assert bool((on.numpy()[near] == 14).all())
    # none far away: no run window reaches x >= 90 mm (liver to 30 mm, + margin + one 32 mm window + interpolation)
    far = np.zeros(hu.shape, bool)
    far[30:] = True
    assert not bool((on.numpy()[far] == 14).any())
    assert int((on == 14).sum()) < int((off == 14).sum())


def test_bad_options_are_refused():
    with pytest.raises(Flare23Error, match="tumor_windows"):
        CascadeInferer(tumor=_branch("tumor", (4.0, 4.0, 6.0)), organ=_branch("organ", (3.0, 3.0, 5.0)), tumor_windows="some")
    with pytest.raises(Flare23Error, match="margin"):
        CascadeInferer(tumor=_branch("tumor", (4.0, 4.0, 6.0)), organ=_branch("organ", (3.0, 3.0, 5.0)), tumor_host_margin_mm=-1)


def test_the_tumor_input_prepared_in_a_thread_while_the_organ_windows_run_gives_the_same_labels(monkeypatch):
    # the CUDA default (overlap_branches="auto"), forced on the CPU: the organ branch runs first, the tumor input in a thread
    _whole_box(monkeypatch)
    hu = _body_phantom()
    hu[hu > 0] = 160.0
    runs = {}
    for overlap in (False, True):
        out, inferer = _segment(hu, _Organs(1.0), _Organs(1.5, hot=14), overlap_branches=overlap, tumor_windows="hosts",
                                tumor_host_margin_mm=5.0)  # fmt: skip
        runs[overlap] = (out, inferer.window_counts[-1])
    assert torch.equal(runs[True][0], runs[False][0]) and runs[True][1] == runs[False][1]
    assert int((runs[True][0] == 1).sum()) > 0
