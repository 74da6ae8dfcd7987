"""MONAI's ``LoadImaged`` for the bundles' inference: a missing, empty or unreadable image is one line naming it.

MONAI's ``LoadImaged`` given an empty path reads the working folder as a DICOM series (``no DICOMs
in: .``; with DICOM files there it would segment the wrong scan), and an unreadable file fails with
the reader's own message, which does not name the file (``EOFError: Compressed file ended before
the end-of-stream marker was reached``). Under MONAI Label either reaches the client as a bare 500.
:class:`LoadCaseImaged` is ``LoadImaged`` (a subclass, so MONAI Label still recognises and
configures it as the bundle's loader) that refuses an empty or missing path before reading and
turns a read failure into :func:`flare23.errors.case_error`: one line ``<file>: <problem>``, which
MONAI Label answers with HTTP 422 and that line in the body, and ``monai.bundle run`` prints as its
error.
"""

from __future__ import annotations

import os

from monai.transforms import LoadImaged

from flare23.errors import case_error


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class LoadCaseImaged(LoadImaged):
    """``LoadImaged`` that names the file when the image is missing, empty or cannot be read."""

    def __call__(self, data, reader=None):
        for key in self.key_iterator(dict(data)):
            path = data[key]
            if isinstance(path, (str, os.PathLike)):
                if not str(path).strip():
                    raise case_error(f"no input image: the path of {key!r} is empty")
                if not os.path.exists(path):
                    raise case_error(f"{path}: no such file or folder")
        try:
            return super().__call__(data, reader)
        except Exception as exc:  # noqa: BLE001 - every read failure becomes one line naming the file
            paths = [str(data[k]) for k in self.key_iterator(dict(data)) if isinstance(data[k], (str, os.PathLike))]
            where = ", ".join(paths) or "the input image"
            raise case_error(f"{where}: cannot be read as an image ({_one_line(exc)})") from exc
