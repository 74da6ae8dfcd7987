"""Validation that also covers the last epoch of a training.

MONAI's ``ValidationHandler`` validates every ``interval`` epochs only. A training that ends on an epoch
the interval skips (a ``time_budget_s`` run that :class:`flare23.training.resume.TimeBudget` stops at an
epoch end, or ``max_epochs`` not a multiple of ``val_interval``) never validates its last epochs, so its
``model.pt`` (the best validated model) cannot be the final one: in issue 24's parity runs the budget
stopped at epochs 27 and 28 and ``model.pt`` was epoch 25's, three epochs of the decayed learning rate
unused. :class:`FinalValidationHandler` validates once more at ``Events.COMPLETED`` when this run
trained at least one epoch and the last one was not validated; the evaluator's own handlers (the
best-model saver, the logs) then treat it like any other validation.
"""

from __future__ import annotations

from ignite.engine import Engine, Events
from monai.handlers import ValidationHandler

__all__ = ["FinalValidationHandler"]


class FinalValidationHandler(ValidationHandler):
    """MONAI's ``ValidationHandler`` (same arguments) that also validates the last epoch when the interval skipped it."""

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        self._trained = False
        self._validated_epoch = None
        if self.epoch_level:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_done)
            engine.add_event_handler(Events.COMPLETED, self._completed)

    def __call__(self, engine: Engine) -> None:
        super().__call__(engine)
        self._validated_epoch = engine.state.epoch

    def _epoch_done(self, engine: Engine) -> None:
        self._trained = True

    def _completed(self, engine: Engine) -> None:
        if self._trained and self._validated_epoch != engine.state.epoch:
            self(engine)
