"""FLARE DSC / NSD (flare23.evaluation.metrics) and the ignite metrics (flare23.evaluation.handlers).

The independent reference is DeepMind's ``surface-distance`` package (test-only dependency) and,
for the FLARE rules, a direct transcription of the organisers' per-class loop written here with it.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import surface_distance as sd
import torch
from scipy import ndimage
from surface_distance import lookup_tables as sd_tables

from flare23.constants import FOREGROUND_IDS, LABEL_KEYS, NSD_TOLERANCE_MM, ORGAN_IDS, SLAB_RESTRICTED_IDS, TUMOR_ID
from flare23.errors import Flare23Error
from flare23.evaluation.metrics import (
    aggregate,
    dice,
    evaluate_case,
    normalized_surface_dice,
    surface_distances,
    surfel_area_table,
)

# surface-distance 0.1 imports scipy.ndimage.filters / .morphology, deprecated aliases that still work
pytestmark = pytest.mark.filterwarnings("ignore:Please import:DeprecationWarning")

AORTA, IVC, ESOPHAGUS, LIVER = 5, 6, 10, 1


# --- independent reference -----------------------------------------------------------------------
def sd_nsd(gt, pred, spacing, tol):
    return sd.compute_surface_dice_at_tolerance(sd.compute_surface_distances(gt.astype(bool), pred.astype(bool), spacing), tol)


def flare_reference(ref, pred, spacing, cutoff=0.1, labels=FOREGROUND_IDS):
    """The organisers' loop (FLARE23_DSC_NSD_Eval) re-written on top of surface-distance."""
    out = {}
    for c in labels:
        g_full, p_full = ref == c, pred == c
        if g_full.sum() == 0 and p_full.sum() == 0:
            out[c] = (1.0, 1.0)
            continue
        if g_full.sum() == 0 or p_full.sum() == 0:
            out[c] = (0.0, 0.0)
            continue
        if c in SLAB_RESTRICTED_IDS:
            z = np.where(g_full)[2]
            g, p = g_full[:, :, z.min() : z.max()], p_full[:, :, z.min() : z.max()]
        else:
            g, p = g_full, p_full
        d = sd.compute_dice_coefficient(g, p)
        n = 0.0 if d < cutoff else sd_nsd(g, p, spacing, NSD_TOLERANCE_MM[c])
        out[c] = (float(d), float(n))
    return out


def blob(shape, rng, sigma=2.5, level=0.3):
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > level * field.std()


def random_label_pair(rng, shape=(44, 38, 34)):
    """A 14-class reference and a perturbed prediction; every rule's branch occurs somewhere."""
    fields = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 3.0) for _ in range(15)])
    fields[0] += 0.05  # some background
    ref = fields.argmax(0).astype(np.uint8)
    pred = ref.copy()
    pred = np.where(ndimage.binary_dilation(ref == 3, iterations=1) & (ref != 3), 3, pred)  # over-segment spleen
    pred[ndimage.binary_erosion(ref == 2, iterations=1) ^ (ref == 2)] = 0  # under-segment right kidney
    pred = np.where(ref == 4, np.roll(ref, 2, axis=0), pred)  # shifted pancreas region
    flip = rng.random(shape) < 0.04
    pred[flip] = rng.integers(0, 15, size=int(flip.sum()))
    pred[pred == 12] = 0  # duodenum missing in the prediction: one-empty rule
    ref[ref == 9] = 0  # gallbladder absent in the reference, present in the prediction
    pred[(pred == 13) & (ref == 13) & (rng.random(shape) < 0.96)] = 0  # left kidney: DSC below 0.1 -> cut-off
    return ref, pred


# --- reference values of METHOD.md ----------------------------------------------------------------
def test_reference_values_half_volumes_and_single_voxels():
    # DeepMind's example: [0:50] vs [0:51] along the first axis of a 100^3 grid at spacing (2, 1, 1).
    # (METHOD.md calls them cubes; only these half-volumes give the stated Dice 0.990 and NSD 0.836.)
    gt = np.zeros((100, 100, 100), bool)
    pred = gt.copy()
    gt[0:50] = True
    pred[0:51] = True
    assert normalized_surface_dice(gt, pred, (2, 1, 1), 1.0) == pytest.approx(0.8361450, abs=1e-6)
    assert dice(gt, pred) == pytest.approx(0.990, abs=5e-4)
    assert dice(gt, pred) == pytest.approx(2 * 50 / 101, abs=1e-12)

    gt = np.zeros((128, 128, 128), np.uint8)
    pred = gt.copy()
    gt[50, 60, 70] = 1
    pred[50, 60, 72] = 1  # 2 mm apart along the third axis (spacing 1 mm there)
    assert normalized_surface_dice(gt, pred, (3, 2, 1), 1.0) == pytest.approx(0.5, abs=1e-12)
    assert dice(gt, pred) == 0.0


def test_surfel_area_table_equals_surface_distance_table():
    kernel = sd_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL
    rng = np.random.default_rng(7)
    for spacing in [(1.0, 1.0, 1.0), (2.0, 1.0, 1.0), (3.0, 2.0, 1.0), (0.82, 0.82, 2.5), *rng.uniform(0.3, 5.0, (3, 3))]:
        ours = surfel_area_table(spacing)
        theirs = sd_tables.create_table_neighbour_code_to_surface_area(spacing)
        for code in range(256):
            cell = np.array([(code >> b) & 1 for b in range(8)], bool).reshape(2, 2, 2)  # our bit 4a+2b+c = corner (a,b,c)
            assert ours[code] == pytest.approx(theirs[int((kernel * cell).sum())], abs=1e-6), (spacing, code)
        assert ours[0] == ours[255] == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_nsd_matches_surface_distance_on_random_anisotropic_blobs_all_tolerances(seed):
    rng = np.random.default_rng(seed)
    shape = (36, 30, 26)
    spacing = tuple(rng.uniform(0.4, 5.0, 3))
    gt = blob(shape, rng)
    pred = ndimage.binary_dilation(gt) if seed % 2 else gt.copy()
    pred ^= blob(shape, rng, 1.5, 1.0) & (rng.random(shape) < 0.5)
    gt[0, :, :] |= rng.random(shape[1:]) < 0.3  # surfaces on the image border too
    for tol in sorted(set(NSD_TOLERANCE_MM.values())) + [0.5, 10.0]:
        assert normalized_surface_dice(gt, pred, spacing, tol) == pytest.approx(sd_nsd(gt, pred, spacing, tol), abs=1e-6)
    ours = surface_distances(gt, pred, spacing)
    theirs = sd.compute_surface_distances(gt, pred, spacing)
    for key in theirs:
        assert np.allclose(np.sort(ours[key]), np.sort(theirs[key]), atol=1e-9), key
    assert dice(gt, pred) == pytest.approx(sd.compute_dice_coefficient(gt, pred), abs=1e-12)


def test_orientation_does_not_change_nsd():
    rng = np.random.default_rng(3)
    gt, pred = blob((30, 26, 22), rng), blob((30, 26, 22), rng)
    gt |= pred & (rng.random(gt.shape) < 0.7)
    spacing = (0.8, 1.3, 3.0)
    base = normalized_surface_dice(gt, pred, spacing, 2.0)
    assert 0.05 < base < 0.99
    flipped = normalized_surface_dice(gt[::-1, :, ::-1], pred[::-1, :, ::-1], spacing, 2.0)
    perm = (2, 0, 1)
    transposed = normalized_surface_dice(gt.transpose(perm), pred.transpose(perm), [spacing[i] for i in perm], 2.0)
    assert flipped == pytest.approx(base, abs=1e-12)
    assert transposed == pytest.approx(base, abs=1e-12)


# --- the FLARE rules, hand-built masks -------------------------------------------------------------
def test_empty_mask_rules():
    ref = np.zeros((10, 10, 10), np.uint8)
    pred = ref.copy()
    ref[2:5, 2:5, 2:5] = LIVER  # liver only in the reference
    pred[6:8, 6:8, 6:8] = 3  # spleen only in the prediction
    res = evaluate_case(ref, pred, (1, 1, 1), labels=(LIVER, 3, 4, AORTA, TUMOR_ID))
    assert res[LIVER] == (0.0, 0.0)
    assert res[3] == (0.0, 0.0)
    assert res[4] == (1.0, 1.0) and res[AORTA] == (1.0, 1.0) and res[TUMOR_ID] == (1.0, 1.0)
    assert dice(np.zeros(5), np.zeros(5)) == 1.0
    assert normalized_surface_dice(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1, 1), 2.0) == 1.0
    assert normalized_surface_dice(ref == LIVER, np.zeros_like(ref), (1, 1, 1), 2.0) == 0.0


def _tube(shape, z0, z1, axis=2, xy=(slice(3, 6), slice(3, 6))):
    mask = np.zeros(shape, bool)
    idx = [xy[0], xy[1]]
    idx.insert(axis, slice(z0, z1))
    mask[tuple(idx)] = True
    return mask


@pytest.mark.parametrize("label", SLAB_RESTRICTED_IDS)
def test_slab_restriction_third_axis_upper_bound_exclusive(label):
    shape = (10, 10, 30)
    spacing = (0.9, 0.9, 2.5)
    g = _tube(shape, 10, 20)  # slices 10..19: slab [10, 19)
    ref = np.where(g, label, 0).astype(np.uint8)

    # prediction far longer than the reference: everything outside [10, 19) is ignored
    pred = np.where(_tube(shape, 0, 30), label, 0).astype(np.uint8)
    assert evaluate_case(ref, pred, spacing, labels=(label,))[label] == (1.0, 1.0)
    # the same masks as liver (no slab rule) are scored on the whole volume
    as_liver = evaluate_case(np.where(g, LIVER, 0), np.where(pred > 0, LIVER, 0), spacing, labels=(LIVER,))[LIVER]
    assert as_liver[0] == pytest.approx(dice(g, pred > 0)) and as_liver[0] == pytest.approx(2 * 10 / 40)

    # missing the top slice (19) does not count: it is the excluded upper bound
    p_top = g.copy()
    p_top[:, :, 19] = False
    assert evaluate_case(ref, np.where(p_top, label, 0), spacing, labels=(label,))[label] == (1.0, 1.0)

    # missing the two bottom slices (10, 11) counts
    p_bottom = g.copy()
    p_bottom[:, :, 10:12] = False
    dsc, nsd = evaluate_case(ref, np.where(p_bottom, label, 0), spacing, labels=(label,))[label]
    g_s, p_s = g[:, :, 10:19], p_bottom[:, :, 10:19]
    assert dsc == pytest.approx(2 * 7 / 16, abs=1e-12)
    assert nsd == pytest.approx(sd_nsd(g_s, p_s, spacing, NSD_TOLERANCE_MM[label]), abs=1e-9)
    assert nsd < 1.0

    # the slab is taken along the array's third axis, not along the tube: a tube along axis 0
    g0 = _tube((30, 10, 10), 10, 20, axis=0)
    p0 = _tube((30, 10, 10), 0, 30, axis=0)
    dsc0, _ = evaluate_case(np.where(g0, label, 0), np.where(p0, label, 0), (2.0, 0.9, 0.9), labels=(label,))[label]
    z = np.where(g0)[2]
    assert dsc0 == pytest.approx(dice(g0[:, :, z.min() : z.max()], p0[:, :, z.min() : z.max()]))
    assert dsc0 == pytest.approx(2 * 60 / (60 + 180))  # a restriction along the tube (axis 0) would give 1.0


def test_slab_prediction_outside_slab_and_single_slice_reference():
    shape = (10, 10, 30)
    ref = np.where(_tube(shape, 10, 20), AORTA, 0).astype(np.uint8)
    pred = np.where(_tube(shape, 19, 30), AORTA, 0).astype(np.uint8)  # only at and above the excluded top slice
    assert evaluate_case(ref, pred, (1, 1, 1), labels=(AORTA,))[AORTA] == (0.0, 0.0)
    # Decision (flare23.evaluation.metrics docstring): a reference in one slice leaves an empty slab -> 1, 1
    ref1 = np.where(_tube(shape, 12, 13), AORTA, 0).astype(np.uint8)
    assert evaluate_case(ref1, pred, (1, 1, 1), labels=(AORTA,))[AORTA] == (1.0, 1.0)
    # non-slab label on a single slice is scored normally
    liver1 = np.where(ref1 > 0, LIVER, 0)
    assert evaluate_case(liver1, liver1, (1, 1, 1), labels=(LIVER,))[LIVER] == (1.0, 1.0)


def test_dsc_cutoff():
    # g: 10 voxels, p: 10 voxels, overlap 1 -> DSC 0.1 exactly; overlap 0 -> 0
    ref = np.zeros((30, 12, 12), np.uint8)
    pred = ref.copy()
    ref[2:12, 5, 5] = LIVER
    pred[11:21, 5, 5] = LIVER  # overlaps at index 11 only
    expected_nsd = sd_nsd(ref == LIVER, pred == LIVER, (1, 1, 1), NSD_TOLERANCE_MM[LIVER])
    assert expected_nsd > 0.1
    dsc, nsd = evaluate_case(ref, pred, (1, 1, 1), labels=(LIVER,), nsd_cutoff=0.1)[LIVER]
    assert dsc == pytest.approx(0.1, abs=1e-15) and dsc >= 0.1
    assert nsd == pytest.approx(expected_nsd, abs=1e-12)  # DSC == cut-off: NSD is computed (strict <)
    dsc, nsd = evaluate_case(ref, pred, (1, 1, 1), labels=(LIVER,), nsd_cutoff=0.2)[LIVER]  # organisers' current value
    assert dsc == pytest.approx(0.1) and nsd == 0.0
    dsc, nsd = evaluate_case(ref, pred, (1, 1, 1), labels=(LIVER,))[LIVER]  # default is 0.1
    assert nsd == pytest.approx(expected_nsd, abs=1e-12)
    pred2 = np.zeros_like(pred)
    pred2[12:20, 5, 5] = LIVER  # touching, no overlap: DSC 0, NSD would be > 0 without the cut-off
    assert sd_nsd(ref == LIVER, pred2 == LIVER, (1, 1, 1), 5.0) > 0.5
    assert evaluate_case(ref, pred2, (1, 1, 1), labels=(LIVER,))[LIVER] == (0.0, 0.0)


@pytest.mark.parametrize("seed", range(3))
def test_evaluate_case_matches_organisers_loop_on_random_14_class_maps(seed):
    rng = np.random.default_rng(100 + seed)
    ref, pred = random_label_pair(rng)
    spacing = tuple(rng.uniform(0.5, 4.0, 3))
    ours = evaluate_case(ref, pred, spacing)
    theirs = flare_reference(ref, pred, spacing)
    assert set(ours) == set(FOREGROUND_IDS)
    for c in FOREGROUND_IDS:
        assert ours[c] == pytest.approx(theirs[c], abs=1e-6), (c, LABEL_KEYS[c])
    # the generator hits every rule
    assert ours[12] == (0.0, 0.0) and ours[9] == (0.0, 0.0)
    assert ours[13][1] == 0.0 and 0 < ours[13][0] < 0.1
    assert all(0.1 < ours[c][1] < 1.0 for c in (1, 2, 3))


def test_evaluate_case_accepts_types_and_leaves_inputs_unchanged():
    rng = np.random.default_rng(5)
    ref, pred = random_label_pair(rng, (20, 18, 16))
    ref_copy, pred_copy = ref.copy(), pred.copy()
    base = evaluate_case(ref, pred, (1.0, 1.5, 2.0))
    assert np.array_equal(ref, ref_copy) and np.array_equal(pred, pred_copy)
    for dtype in (np.int16, np.int64, np.float32):
        assert evaluate_case(ref.astype(dtype), pred.astype(dtype), (1.0, 1.5, 2.0)) == base
    assert evaluate_case(ref, pred, np.array([1.0, 1.5, 2.0], np.float32)) == base


def test_evaluate_case_errors():
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(Flare23Error, match="differs"):
        evaluate_case(a, np.zeros((4, 4, 5), np.uint8), (1, 1, 1))
    with pytest.raises(Flare23Error, match="spacing"):
        evaluate_case(a, a, (1, 0, 1))
    with pytest.raises(Flare23Error, match="spacing"):
        evaluate_case(a, a, (1, 1))
    with pytest.raises(Flare23Error, match="non-integer"):
        evaluate_case(a, a + 0.5, (1, 1, 1))
    with pytest.raises(Flare23Error, match="3D"):
        evaluate_case(np.zeros((4, 4)), np.zeros((4, 4)), (1, 1, 1))


def test_aggregate_challenge_means():
    rng = np.random.default_rng(11)
    per_case = [{c: (float(rng.random()), float(rng.random())) for c in FOREGROUND_IDS} for _ in range(5)]
    summary = aggregate(per_case)
    table = np.array([[per_case[i][c] for c in FOREGROUND_IDS] for i in range(5)])  # case, class, (dsc, nsd)
    class_means = table.mean(axis=0)
    organ_rows = [FOREGROUND_IDS.index(c) for c in ORGAN_IDS]
    assert summary["organ_dsc"] == pytest.approx(class_means[organ_rows, 0].mean(), abs=1e-12)
    assert summary["organ_nsd"] == pytest.approx(class_means[organ_rows, 1].mean(), abs=1e-12)
    assert summary["tumor_dsc"] == pytest.approx(class_means[-1, 0], abs=1e-12)
    assert summary["tumor_nsd"] == pytest.approx(class_means[-1, 1], abs=1e-12)
    assert summary["n_cases"] == 5
    assert list(summary["per_class"]) == [LABEL_KEYS[c] for c in FOREGROUND_IDS]
    assert summary["per_class"]["inferior_vena_cava"]["dsc"] == pytest.approx(class_means[5, 0])
    # the organ score is NOT the mean over all (case, organ) pairs when cases score different classes
    partial = aggregate([{1: (1.0, 1.0), 2: (0.0, 0.0)}, {1: (0.0, 0.0)}])
    assert partial["organ_dsc"] == pytest.approx((0.5 + 0.0) / 2) and partial["tumor_dsc"] is None


# --- ignite metrics --------------------------------------------------------------------------------


def _engine_run(metrics: dict, batches: list) -> dict:
    from ignite.engine import Engine
    from monai.handlers import from_engine

    engine = Engine(lambda e, batch: batch)
    for name, metric_cls in metrics.items():
        metric_cls(from_engine(["pred", "label"])).attach(engine, name)
    engine.run(batches, max_epochs=1)
    return engine.state.metrics


def _meta(arr, spacing):
    from monai.data import MetaTensor

    return MetaTensor(torch.as_tensor(arr), affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)))


def test_flare_dsc_and_nsd_in_an_ignite_engine_match_evaluate_case():
    from flare23.evaluation.handlers import FlareDSC, FlareNSD

    torch.set_num_threads(1)
    rng = np.random.default_rng(21)
    cases = []
    for _ in range(4):
        ref, pred = random_label_pair(rng, (28, 24, 20))
        cases.append((ref, pred, tuple(rng.uniform(0.6, 3.0, 3))))
    expected = [evaluate_case(r, p, s) for r, p, s in cases]

    def onehot(x):
        return np.eye(15, dtype=np.float32)[x].transpose(3, 0, 1, 2)

    # decollated lists: one-hot prediction, label map reference, MetaTensors carrying the spacing; 2 batches of 2
    batches = [
        {
            "pred": [_meta(onehot(p), s) for _, p, s in cases[i : i + 2]],
            "label": [_meta(r[None].astype(np.float32), s) for r, _, s in cases[i : i + 2]],
        }
        for i in (0, 2)
    ]
    for ids in (ORGAN_IDS, (TUMOR_ID,), SLAB_RESTRICTED_IDS):
        metrics = _engine_run(
            {"dsc": lambda t, ids=ids: FlareDSC(label_ids=ids, output_transform=t), "nsd": lambda t, ids=ids: FlareNSD(ids, t)},
            batches,
        )
        exp_dsc = np.mean([np.mean([e[c][0] for e in expected]) for c in ids])
        exp_nsd = np.mean([np.mean([e[c][1] for e in expected]) for c in ids])
        assert metrics["dsc"] == pytest.approx(exp_dsc, abs=1e-12), ids
        assert metrics["nsd"] == pytest.approx(exp_nsd, abs=1e-12), ids
    assert 0.2 < metrics["dsc"] < 1.0


def test_flare_dsc_batched_label_maps_and_warning_without_spacing():
    from flare23.evaluation.handlers import FlareDSC, FlareNSD

    rng = np.random.default_rng(22)
    pairs = [random_label_pair(rng, (20, 18, 16)) for _ in range(3)]
    batch = {
        "pred": torch.as_tensor(np.stack([p for _, p in pairs])[:, None]),  # (B, 1, X, Y, Z) integer label maps
        "label": torch.as_tensor(np.stack([r for r, _ in pairs])[:, None]),
    }
    expected = [evaluate_case(r, p, (1, 1, 1)) for r, p in pairs]
    ids = (1, 2, 3, AORTA, 12, 14)
    metric = FlareDSC(label_ids=ids)
    metric.update((batch["pred"], batch["label"]))
    value = metric.compute()
    assert value == pytest.approx(np.mean([np.mean([e[c][0] for e in expected]) for c in ids]), abs=1e-12)
    assert metric.per_class[12] == 0.0 and metric.per_class[AORTA] == pytest.approx(np.mean([e[AORTA][0] for e in expected]))

    nsd = FlareNSD(label_ids=ids)
    with pytest.warns(UserWarning, match="1 mm"):
        nsd.update((batch["pred"], batch["label"]))
    assert nsd.compute() == pytest.approx(np.mean([np.mean([e[c][1] for e in expected]) for c in ids]), abs=1e-12)

    from ignite.exceptions import NotComputableError

    metric.reset()
    with pytest.raises(NotComputableError):
        metric.compute()
    with pytest.raises(Flare23Error, match="predictions"):
        metric.update(([batch["pred"][0]], [batch["label"][0], batch["label"][1]]))


def _ddp_worker(local_rank, results):
    from flare23.evaluation.handlers import FlareDSC

    rng = np.random.default_rng(31)
    pairs = [random_label_pair(rng, (16, 14, 12)) for _ in range(4)]
    rank = __import__("ignite.distributed", fromlist=["x"]).get_rank()
    mine = pairs[rank::2]  # each rank sees different cases, like a DistributedSampler
    metric = FlareDSC(label_ids=(1, 2, 3, AORTA))
    metric.update(([torch.as_tensor(p)[None] for _, p in mine], [torch.as_tensor(r)[None] for r, _ in mine]))
    results[rank] = metric.compute()


@pytest.mark.slow
def test_flare_dsc_reduces_across_ddp_processes(tmp_path):
    import torch.multiprocessing as mp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import ignite.distributed as idist

    rng = np.random.default_rng(31)
    pairs = [random_label_pair(rng, (16, 14, 12)) for _ in range(4)]
    expected = [evaluate_case(r, p, (1, 1, 1), labels=(1, 2, 3, AORTA)) for r, p in pairs]
    exp = np.mean([np.mean([e[c][0] for e in expected]) for c in (1, 2, 3, AORTA)])
    manager = mp.Manager()
    results = manager.dict()
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(_ddp_worker, results)
    assert len(results) == 2
    for v in results.values():
        assert v == pytest.approx(exp, abs=1e-12)
    assert not math.isnan(exp)


def test_flare_dsc_as_key_metric_of_a_monai_evaluator():
    """The bundle-config usage: key_val_metric of a SupervisedEvaluator on decollated outputs."""
    from monai.engines import SupervisedEvaluator
    from monai.handlers import from_engine
    from monai.inferers import SimpleInferer

    from flare23.evaluation.handlers import FlareDSC

    rng = np.random.default_rng(23)
    pairs = [random_label_pair(rng, (20, 16, 12)) for _ in range(4)]
    eye = np.eye(15, dtype=np.float32)
    loader = [
        {
            "image": torch.as_tensor(np.stack([eye[p].transpose(3, 0, 1, 2) for _, p in pairs[i : i + 2]])),
            "label": torch.as_tensor(np.stack([r[None] for r, _ in pairs[i : i + 2]])),
        }
        for i in (0, 2)
    ]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=torch.nn.Identity(),
        inferer=SimpleInferer(),
        key_val_metric={"val_mean_organ_dsc": FlareDSC(label_ids=ORGAN_IDS, output_transform=from_engine(["pred", "label"]))},
    )
    evaluator.run()
    expected = [evaluate_case(r, p, (1, 1, 1), labels=ORGAN_IDS) for r, p in pairs]
    exp = np.mean([np.mean([e[c][0] for e in expected]) for c in ORGAN_IDS])
    assert evaluator.state.metrics["val_mean_organ_dsc"] == pytest.approx(exp, abs=1e-12)
    assert evaluator.state.best_metric == pytest.approx(exp, abs=1e-12)
