"""The cascade inferer: geometry in every orientation, labels at their physical place, seams, wiring.

Oracle networks replace trained weights: the ROI network says "abdomen" everywhere, the organ
network labels voxels brighter than a HU threshold as aorta (a label that post-processing leaves
alone), the tumor network says background. The expected result is then the threshold of the
input itself, computed independently at full resolution.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from flare23.inference.branches import Branch, CascadeNetworks
from flare23.inference.cascade import CascadeInferer
from flare23.inference.cases import ReadCased, SaveLabeld

THRESHOLD_HU = 150.0
AORTA = 5


class _Const(torch.nn.Module):
    """Constant logits: channel ``hot`` wins everywhere."""

    def __init__(self, channels: int, hot: int):
        super().__init__()
        self.channels, self.hot = channels, hot
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros((x.shape[0], self.channels, *x.shape[2:]), dtype=x.dtype, device=x.device)
        out[:, self.hot] = 1.0
        return out + 0 * self.dummy


class _Threshold(torch.nn.Module):
    """Aorta where the normalised input exceeds ``t``, background elsewhere (soft, so interpolation is smooth)."""

    def __init__(self, t: float):
        super().__init__()
        self.t = t
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.full((x.shape[0], 15, *x.shape[2:]), -30.0, dtype=x.dtype, device=x.device)
        out[:, 0] = 0.0
        out[:, AORTA] = 20.0 * (x[:, 0] - self.t)
        return out + 0 * self.dummy


def _branch(name, spacing, patch=(32, 32, 16), overlap=0.25) -> Branch:
    return Branch(
        name=name,
        target_spacing=spacing,
        patch_size=patch,
        overlap=overlap,
        clip_low=-1000.0,
        clip_high=1000.0,
        mean=0.0,
        std=100.0,
    )


def _networks():
    return CascadeNetworks(roi=_Const(2, 1), organ=_Threshold(THRESHOLD_HU / 100.0), tumor=_Const(15, 0)).eval()


def _variants(image: np.ndarray, affine: np.ndarray):
    """The same physical image as RAS, LPS, LAS, z-flipped, axes permuted, and with an oblique affine."""
    out = {"ras": (image, affine)}
    for name, codes in (("lps", "LPS"), ("las", "LAS"), ("ras_zflip", "RAI"), ("permuted", "SRA")):
        img = nib.Nifti1Image(image, affine)
        ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(codes))
        new = img.as_reoriented(ornt)
        out[name] = (np.asarray(new.dataobj), new.affine)
    theta = np.deg2rad(12.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0, 0], [np.sin(theta), np.cos(theta), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    out["oblique"] = (image, rot @ affine)
    return out


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def _run(inferer, image, affine):
    from monai.data import MetaTensor

    x = MetaTensor(torch.from_numpy(np.ascontiguousarray(image))[None, None], affine=torch.as_tensor(affine))
    return inferer(x, _networks())[0, 0].numpy()


@pytest.fixture(scope="module")
def real_ct(real_ct_dir):
    img = nib.load(str(real_ct_dir / "ct.nii.gz"))
    return np.asarray(img.dataobj).astype(np.int16), img.affine


def test_geometry_and_physical_place_in_every_orientation(real_ct):
    torch.set_num_threads(1)
    image, affine = real_ct
    inferer = CascadeInferer(
        tumor=_branch("tumor", (6.0, 6.0, 6.0)),
        organ=_branch("organ", (2.0, 2.0, 2.5)),
        block=7,
        precision="fp32",
        postprocessing=True,
    )
    canonical = canonical_array = None
    for name, (img, aff) in _variants(image, affine).items():
        labels = _run(inferer, img, aff)
        assert labels.shape == img.shape and labels.dtype == np.uint8, name
        expected = img > THRESHOLD_HU
        got = labels == AORTA
        assert set(np.unique(labels)) <= {0, AORTA}, name
        score = _dice(got, expected)
        assert score > 0.85, (name, score)
        # no offset: a one-voxel shift along any axis, either way, only makes it worse
        shifted = [_dice(np.roll(got, s, axis=a), expected) for a in range(3) for s in (-1, 1)]
        assert score > max(shifted) + 0.1, (name, score, shifted)
        # the same physical result whatever the array order: compare in canonical RAS
        ras = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(labels, aff)).dataobj)
        if name == "oblique":
            assert np.array_equal(labels, canonical_array), name  # same array, only the affine rotated
            continue
        if canonical is None:
            canonical, canonical_array = ras, labels
        else:
            assert _dice(ras == AORTA, canonical == AORTA) > 0.97, name


def test_blocked_back_resampling_has_no_seams(real_ct):
    torch.set_num_threads(1)
    image, affine = real_ct
    results = []
    for block in (5, 37, 10_000):
        inferer = CascadeInferer(
            tumor=_branch("tumor", (6.0, 6.0, 6.0)), organ=_branch("organ", (4.5, 4.5, 4.5)), block=block, precision="fp32"
        )
        results.append(_run(inferer, image, affine))
    assert np.array_equal(results[0], results[2]) and np.array_equal(results[1], results[2])


def test_empty_roi_gives_background_and_warning(real_ct):
    image, affine = real_ct
    inferer = CascadeInferer(tumor=_branch("tumor", (6.0, 6.0, 6.0)), organ=_branch("organ", (4.5, 4.5, 4.5)), precision="fp32")
    nets = CascadeNetworks(roi=_Const(2, 0), organ=_Threshold(1.5), tumor=_Const(15, 0)).eval()
    from monai.data import MetaTensor

    x = MetaTensor(torch.from_numpy(image[None, None].copy()), affine=torch.as_tensor(affine))
    with pytest.warns(UserWarning, match="no abdomen"):
        out = inferer(x, nets)
    assert out.shape[2:] == image.shape and int(out.max()) == 0


def test_stage_timings_are_recorded(real_ct):
    image, affine = real_ct
    inferer = CascadeInferer(tumor=_branch("tumor", (6.0, 6.0, 6.0)), organ=_branch("organ", (4.5, 4.5, 4.5)), precision="fp32")
    _run(inferer, image, affine)
    stages = set(inferer.timings[-1])
    for stage in (
        "roi",
        "crop",
        "tumor_preprocess",
        "tumor_network",
        "tumor_resample",
        "organ_preprocess",
        "organ_network",
        "organ_resample",
        "ensemble",
        "postprocess",
        "paste",
    ):
        assert stage in stages
    assert all(v >= 0 for v in inferer.timings[-1].values())


def test_read_and_save_keep_the_input_geometry(real_ct_dir, tmp_path):
    d = ReadCased(keys="image")({"image": str(real_ct_dir / "ct.nii.gz"), "name": "ct"})
    ref = nib.load(str(real_ct_dir / "ct.nii.gz"))
    assert tuple(d["image"].shape[1:]) == ref.shape
    assert np.allclose(d["image"].affine.numpy(), ref.affine)
    labels = torch.zeros((1, *ref.shape), dtype=torch.uint8)
    labels[0, 10:20, 10:20, 10:20] = 3
    SaveLabeld(keys="pred", output_dir=str(tmp_path))({"image": d["image"], "pred": labels})
    out = nib.load(str(tmp_path / "ct.nii.gz"))
    assert out.shape == ref.shape and np.array_equal(out.affine, ref.affine) and out.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(out.dataobj), labels[0].numpy())
    assert [p.name for p in tmp_path.iterdir()] == ["ct.nii.gz"]  # no temporary file left


def test_save_refuses_to_overwrite_the_input(tmp_path):
    from flare23.errors import Flare23Error

    src = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), str(src))
    before = src.read_bytes()
    d = ReadCased(keys="image")({"image": str(src), "name": "case"})
    with pytest.raises(Flare23Error, match="over the input"):
        SaveLabeld(keys="pred", output_dir=str(tmp_path))(
            {"image": d["image"], "pred": torch.zeros((1, 4, 4, 4), dtype=torch.uint8)}
        )
    assert src.read_bytes() == before


class _Recorder(torch.nn.Module):
    """Background everywhere; keeps every window it is given."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.seen.append(x.detach().clone())
        out = torch.zeros((x.shape[0], 15, *x.shape[2:]), dtype=x.dtype, device=x.device)
        out[:, 0] = 1.0
        return out + 0 * self.dummy


def test_windows_past_a_small_crop_are_padded_as_in_training():
    # Training pads patches with SpatialPadd's 0 (the fingerprint mean after normalisation) and
    # validates with MONAI's sliding window, which pads with 0 too. Instance norm makes every
    # voxel's prediction depend on the padding, so inference must pad alike: with air (the crop's
    # minimum) the organ DSC of the short phantom training fell from 0.766 to 0.752 (issue 6).
    from flare23.inference.cascade import StageTimer

    crop = torch.full((1, 1, 20, 40, 10), 2.5)
    crop[..., :3] = -4.0  # the crop's minimum: not what the padding may be
    net = _Recorder()
    inferer = CascadeInferer(tumor=_branch("tumor", (4.0, 1.2, 1.2)), organ=_branch("organ", (2.5, 0.8, 0.8)))
    labels = inferer._labels(inferer.organ, net, crop, (20, 40, 10), torch.device("cpu"), StageTimer(torch.device("cpu")))
    assert labels.shape == (20, 40, 10) and int(labels.max()) == 0
    assert net.seen, "no window was run"
    for window in net.seen:
        assert tuple(window.shape[2:]) == (32, 32, 16)
        inside = (window == 2.5) | (window == -4.0)
        assert int(inside.sum()) == window.shape[0] * 20 * 32 * 10  # the whole crop along x and z, 32 of 40 along y
        assert bool((window[~inside] == 0.0).all())
