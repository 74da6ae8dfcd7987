"""Training helpers shared by every bundle: crash-safe checkpoints, resume from the last one, safe weight loading.

* :class:`SafeCheckpointSaver` is MONAI's ``CheckpointSaver`` with a crash-safe writer. MONAI 1.6.1 builds
  ignite's ``DiskSaver`` with ``atomic=False`` (so ``torch.save`` writes straight into
  ``checkpoint_epoch=N.pt``), and ignite 0.5.5's ``Checkpoint`` removes the older file *before* it saves
  the new one: a kill during a save with ``n_saved=1`` leaves one truncated checkpoint and nothing to
  resume from (``tests/test_resume.py`` shows it). :class:`AtomicDiskSaver` writes to a temporary file
  beside the target (:func:`flare23.io.atomic_path`), fsyncs it, renames it over the target, fsyncs the
  folder, and only then deletes the files that ``Checkpoint`` asked it to remove. The saver also takes
  over the ``checkpoint_epoch=N.pt`` files of the run it resumes, so that ``n_saved`` still holds after a
  resume, and its ``state_dict`` carries the best-model tracking (best key metric so far), so that a
  resumed run does not overwrite ``model.pt`` with a worse model.
* :class:`ResumeFromLast` is an ignite handler, attached by the configs' ``run`` (it needs the trainer,
  which a handler inside ``train#handlers`` cannot reference: MONAI's parser rejects that as a circular
  reference). At ``Events.STARTED`` it restores model, optimiser, scheduler and trainer counters from
  the newest complete ``checkpoint_epoch=N.pt``, skipping (with a warning) files that are truncated or
  left by an interrupted save. A scheduler with a ``total_iters`` horizon (``PolynomialLR``) keeps the
  horizon of the *current* config: resuming with a larger ``max_epochs`` continues the poly decay
  towards the new end instead of reaching 0 at the old one.
* :class:`TimeBudget` (configs' ``time_budget_s``) fits a training into a wall-clock budget: it times the
  first epochs and lowers ``max_epochs`` and the poly horizon (:func:`set_horizon`) so that the decay
  completes within the budget.
* :class:`~flare23.training.validation.FinalValidationHandler` is MONAI's ``ValidationHandler`` that also
  validates the last epoch when ``val_interval`` skipped it (a budget-stopped run keeps its final model).
* :func:`load_weights` loads an untrusted checkpoint with ``weights_only=True`` and refuses missing,
  unexpected or mis-shaped keys with a one-line error instead of a partial load; the one exception is
  the deep-supervision heads a training wrote and an inference network is built without, dropped by name
  (:func:`~flare23.training.checkpoints.unused_head_keys`; :func:`~flare23.training.checkpoints.accept_trained_state`
  gives the inference networks' own ``load_state_dict`` the same rule, for MONAI's loaders).

Modules: :mod:`~flare23.training.checkpoints`, :mod:`~flare23.training.savers` (it imports ignite and MONAI's handlers, which take seconds: only the training configs import it, never inference), :mod:`~flare23.training.resume` (:class:`~flare23.training.resume.ResumeFromLast`, :class:`~flare23.training.resume.TimeBudget`), :mod:`~flare23.training.validation`.
"""
