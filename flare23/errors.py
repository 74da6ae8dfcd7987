"""The project's user-facing error type.

Every problem caused by the user's input (a file, a folder, an option) is raised as a
:class:`Flare23Error` whose message is one line naming the file or case and the problem. The CLI
prints it as ``flare23: error: <message>`` and exits with status 2. :class:`CaseError` is the one
for a case that cannot be segmented; inside a web server (MONAI Label) :func:`case_error` makes it an
HTTP answer whose body names the problem.
"""

import sys


class Flare23Error(Exception):
    """A one-line, user-facing error about an input, an output location or an option."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class CaseError(Flare23Error):
    """A case that could not be segmented: one line naming the input file and the problem."""


def case_error(message: str, status: int = 422) -> CaseError:
    """A :class:`CaseError`; inside a Starlette / FastAPI server (MONAI Label) also an ``HTTPException`` with ``status``.

    MONAI Label 0.8.5 registers no handler for its own or its tasks' exceptions: any other
    exception reaches the client as a bare ``500 Internal Server Error``. An ``HTTPException``
    is the one kind that FastAPI answers with its status and its ``detail`` in the body
    (``{"detail": "<file>: <problem>"}``), so the client learns what went wrong. Starlette is
    never imported here: the web flavour is used only where the server has loaded it already.
    """
    http = sys.modules.get("starlette.exceptions")
    base = getattr(http, "HTTPException", None)
    if not isinstance(base, type) or not issubclass(base, Exception):
        return CaseError(message)
    cls = _HTTP_CASE_ERRORS.get(base)
    if cls is None:

        def __init__(self, message: str, status: int = 422):  # noqa: N807 - method of the class made below
            text = " ".join(str(message).split())  # one line, as Flare23Error makes it
            Exception.__init__(self, text)
            base.__init__(self, status_code=int(status), detail=text)

        def __str__(self) -> str:  # noqa: N807 - method of the class made below
            return str(self.detail)

        cls = type("CaseError", (CaseError, base), {"__init__": __init__, "__str__": __str__, "__module__": __name__})
        _HTTP_CASE_ERRORS[base] = cls
    return cls(message, status)


_HTTP_CASE_ERRORS: dict[type, type] = {}
