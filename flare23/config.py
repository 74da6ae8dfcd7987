"""Small helpers for values that arrive from bundle configs and command lines."""

from __future__ import annotations

from flare23.errors import Flare23Error

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def as_bool(value, name: str = "value") -> bool:
    """``True``/``False`` from a bool or the strings a command line gives (``--load_pretrain false``).

    ``python -m monai.bundle run ... --flag false`` passes the *string* ``"false"``, which Python
    would treat as true; this turns it into ``False`` and rejects anything ambiguous.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise Flare23Error(f"{name}: expected true or false, got {value!r}")
