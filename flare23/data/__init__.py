"""FLARE data tools: full labels from partial + pseudo labels, ROI labels, crops, CT fingerprint, datalists.

Each tool is a ``flare23`` subcommand (``merge-labels``, ``roi-labels``, ``crop``, ``fingerprint``,
``datalist``) over FLARE / nnU-Net style folders (images ``<case>_0000.nii.gz``, labels
``<case>.nii.gz``), with a pure function on arrays beside it (:func:`merge_labels`,
:func:`flare23.roi.geometry.roi_labels`, :func:`bbox_with_margin`, :func:`intensity_fingerprint`, :func:`split_cases`).
The rules are those of ``METHOD.md`` section 2.

Bad input and partial results. Every command checks, before it creates or writes anything, that
every image has its label (and every partial label its pseudo label) and that each file's header
describes a readable 3D volume whose shape and affine match its partner; then that the output
folder is writable and is not an input folder (for ``crop``: new or empty). Then the cases are
processed (in parallel with ``workers`` > 1, with a progress bar on a terminal); each case reads and
validates all its inputs in full (a truncated file is found here) before it writes its outputs,
which are written atomically. The first
failure stops the run: a one-line :class:`~flare23.errors.Flare23Error` that names the case and the
problem, exit status 2 (see :mod:`flare23.cli`). The failing case leaves no file; cases finished
before it keep their (complete) output files. Inputs are only ever opened for reading.

Modules: :mod:`~flare23.data.prepare` (what every command shares), :mod:`~flare23.data.labels` (``merge-labels``), :mod:`~flare23.data.crop` (``roi-labels``, ``crop``), :mod:`~flare23.data.fingerprint` (``fingerprint``), :mod:`~flare23.data.datalists` (``datalist``); reading CT: :mod:`~flare23.data.readers`; grids: :mod:`~flare23.data.spacing` (the one resampling convention), :mod:`~flare23.data.resample`, :mod:`~flare23.data.grids` (the one reorientation), :mod:`~flare23.data.boxes`.
"""
