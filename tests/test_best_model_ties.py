"""The fine bundles' best-model rule: a validation that ties the best score replaces ``model.pt`` (the later model wins).

The tumor model's key metric is the validation tumor DSC, which stays exactly 0 for the first
validations of a short run (no tumor found yet). With MONAI's default (strictly greater) the first
model stayed ``model.pt`` for the whole run (issue 24's first parity run: epoch 5 of 15). The configs
set ``key_metric_greater_or_equal`` on the saver and a ``>=`` ``metric_cmp_fn`` on the evaluator, so
the saved file and the logged best epoch agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.metrics import Metric
from monai.bundle import ConfigParser
from monai.engines import Evaluator, SupervisedEvaluator

from flare23.training.checkpoints import torch_load_safe
from flare23.training.savers import SafeCheckpointSaver

ROOT = Path(__file__).resolve().parents[1]


class Scripted(Metric):
    """A key metric that returns the next value of ``scores`` at each validation."""

    def __init__(self, scores):
        self.scores = list(scores)
        super().__init__()

    def reset(self):
        pass

    def update(self, output):
        pass

    def compute(self):
        return self.scores.pop(0)


@pytest.mark.parametrize("bundle", ["organ_seg", "tumor_seg"])
def test_a_tied_validation_score_keeps_the_later_model(bundle, tmp_path):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "train.json"))
    saver_args = {k: v for k, v in parser.get("validate#best_model_saver").items() if k not in ("_target_", "save_dir", "save_dict")}
    cmp = parser.get_parsed_content("validate#evaluator#metric_cmp_fn")
    net = torch.nn.Conv3d(1, 2, 1)
    saver = SafeCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": net, "step": torch.nn.Identity()}, **saver_args)
    data = [{"image": torch.zeros(1, 1, 2, 2, 2), "label": torch.zeros(1, 1, 2, 2, 2)}]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=data,
        network=net,
        key_val_metric={"val": Scripted([0.0, 0.0, 0.5, 0.2])},
        metric_cmp_fn=cmp,
        val_handlers=[saver],
    )
    weights = []
    for epoch in (1, 2, 3, 4):
        with torch.no_grad():
            net.weight.fill_(float(epoch))
        weights.append(net.weight.detach().clone())
        evaluator.run(global_epoch=epoch)
        saved = torch_load_safe(tmp_path / "model.pt")["model"]["weight"]
        best = {1: 1, 2: 2, 3: 3, 4: 3}[epoch]  # 0 then 0 (tie: the later), 0.5, then 0.2 (worse: kept 3)
        torch.testing.assert_close(saved, weights[best - 1])
        assert evaluator.state.best_metric_epoch == best


class _Validator(Evaluator):
    """Stands in for the evaluator (MONAI's handler checks the type): records the epochs it is run for."""

    def __init__(self):  # noqa: D107 - nothing of Evaluator's state is needed
        self.epochs = []

    def run(self, epoch):
        self.epochs.append(epoch)


def _train(max_epochs, interval, stop_after=None, start_epoch=0):
    from ignite.engine import Engine, Events

    from flare23.training.validation import FinalValidationHandler

    validator = _Validator()
    engine = Engine(lambda e, b: None)
    FinalValidationHandler(interval=interval, validator=validator, epoch_level=True).attach(engine)
    if stop_after is not None:  # as TimeBudget: terminate at an epoch end
        engine.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda e: e.terminate())
    if start_epoch:  # a resumed run: the trainer's counters restored before the loop
        engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "epoch", start_epoch))
    engine.run(range(2), max_epochs=max_epochs)
    return validator.epochs


def test_the_last_epoch_is_validated_when_the_interval_skipped_it():
    assert _train(max_epochs=10, interval=5) == [5, 10]  # the interval covered it: no second validation
    assert _train(max_epochs=12, interval=5) == [5, 10, 12]  # max_epochs not a multiple of the interval
    assert _train(max_epochs=29, interval=5, stop_after=27) == [5, 10, 15, 20, 25, 27]  # stopped by a budget
    assert _train(max_epochs=29, interval=5, stop_after=25) == [5, 10, 15, 20, 25]
    assert _train(max_epochs=12, interval=5, start_epoch=12) == []  # resumed when already complete: nothing trained


@pytest.mark.parametrize("bundle", ["organ_seg", "tumor_seg", "roi_extractor"])
def test_bundles_validate_their_last_epoch(bundle):
    from flare23.training.validation import FinalValidationHandler

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "train.json"))
    handlers = [h for h in parser.get("train#handlers") if isinstance(h, dict) and "ValidationHandler" in h.get("_target_", "")]
    assert [h["_target_"] for h in handlers] == ["flare23.training.validation.FinalValidationHandler"]
    assert handlers[0]["interval"] == "@val_interval" and handlers[0]["validator"] == "@validate#evaluator"
    assert FinalValidationHandler.__mro__[1].__name__ == "ValidationHandler"
