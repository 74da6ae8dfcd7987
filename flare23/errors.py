"""The project's user-facing error type.

Every problem caused by the user's input (a file, a folder, an option) is raised as a
:class:`Flare23Error` whose message is one line naming the file or case and the problem. The CLI
prints it as ``flare23: error: <message>`` and exits with status 2.
"""


class Flare23Error(Exception):
    """A one-line, user-facing error about an input, an output location or an option."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
