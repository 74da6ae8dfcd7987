"""Datalists: deterministic train / validation splits of a case folder (``flare23 datalist``)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from flare23.data.prepare import _check_headers, _header_geometry, _pair_folders, _prefixed
from flare23.errors import Flare23Error
from flare23.io import (
    atomic_write_json,
    ensure_output_dir,
    index_cases,
)


def split_score(case: str, seed: int = 0) -> float:
    """A number in [0, 1) fixed by the case name and the seed (SHA-256), used to split cases."""
    digest = hashlib.sha256(f"{int(seed)}/{case}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_cases(cases: Sequence[str], validation_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic training / validation split by case name.

    A case goes to validation when :func:`split_score` ``(case, seed) < validation_fraction``, so a
    case's side depends only on its name and the seed: adding cases never moves existing ones.
    With at least two cases and a fraction in (0, 1), neither side is left empty: if it would be,
    the case with the lowest score is moved to validation (or the highest to training); only in
    that small-data case can adding cases move this one case back.
    """
    if not 0.0 <= float(validation_fraction) < 1.0:
        raise Flare23Error(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    names = sorted(set(cases))
    scores = {c: split_score(c, seed) for c in names}
    validation = {c for c in names if scores[c] < validation_fraction}
    if len(names) >= 2 and validation_fraction > 0:
        if not validation:
            validation = {min(names, key=scores.__getitem__)}
        elif len(validation) == len(names):
            validation.discard(max(names, key=scores.__getitem__))
    return [c for c in names if c not in validation], [c for c in names if c in validation]


# --- datalist ------------------------------------------------------------------------------------
def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(Path(path).absolute(), base.absolute())).as_posix()


def make_datalist(
    images, labels=None, base_dir=None, validation_fraction: float = 0.2, seed: int = 0, check: bool = True
) -> dict:
    """MONAI datalist dict for the images (and labels) folders, paths relative to ``base_dir``.

    With labels: ``{"training": [...], "validation": [...]}`` of ``{"image", "label"}`` split by
    :func:`split_cases`; every image needs its label and vice versa. Without labels:
    ``{"testing": [{"image"}...]}``. ``check`` reads every header (not the voxel data) to
    verify 3D shapes and that image and label grids match.
    """
    base_dir = Path(base_dir) if base_dir is not None else Path(images).absolute().parent
    if labels is None:
        files = index_cases(images, images=True)
        if check:
            for case, path in files.items():
                try:
                    _header_geometry(path)
                except Flare23Error as exc:
                    raise _prefixed(case, exc) from None
        return {"testing": [{"image": _relative(files[c], base_dir)} for c in sorted(files)]}
    pairs = _pair_folders(images, labels, True, "image", "label")
    if check:
        _check_headers(pairs)
    by_case = {case: {"image": _relative(img, base_dir), "label": _relative(lbl, base_dir)} for case, img, lbl in pairs}
    training, validation = split_cases(list(by_case), validation_fraction, seed)
    return {"training": [by_case[c] for c in training], "validation": [by_case[c] for c in validation]}


def datalist_cli(
    images: str, labels: str | None = None, out: str | None = None, validation_fraction: float = 0.2, seed: int = 0
) -> None:
    """Write a MONAI datalist JSON (``monai.data.load_decathlon_datalist`` reads it).

    Args:
        images: folder of ``<case>_0000.nii.gz`` (e.g. ``imagesTr``).
        labels: folder of ``<case>.nii.gz`` (e.g. ``labelsTr``); without it, an image-only
            ``testing`` list is written.
        out: JSON file (default ``<images>/../datalist.json``); paths inside are relative to its folder.
        validation_fraction: share of cases put in ``validation``, chosen by a hash of the case name
            and ``seed`` (adding cases does not move existing ones; see :func:`split_cases`).
        seed: seed of the split.
    """
    out = Path(out) if out is not None else Path(images).absolute().parent / "datalist.json"
    if out.is_dir():
        out = out / "datalist.json"
    if out.suffix != ".json":
        raise Flare23Error(f"{out}: the datalist must be a .json file")
    split_cases([], validation_fraction, seed)  # validates the option before reading anything
    data = make_datalist(images, labels, out.parent, validation_fraction, seed)
    ensure_output_dir(out.parent)
    atomic_write_json(out, data)
    if labels is None:
        print(f"datalist of {len(data['testing'])} test images -> {out}")
    else:
        print(f"datalist: {len(data['training'])} training, {len(data['validation'])} validation cases -> {out}")
