"""The ``flare23`` command line (``flare23 COMMAND --help`` for each command).

Commands are plain functions of the package modules, exposed with ``fire``. User errors
(:class:`~flare23.errors.Flare23Error`) are printed as one line and exit with status 2; user warnings
(an empty ROI, NaN voxels, an image that does not look like CT, ...) as one line
``flare23: warning: <message>``. ``flare23 --help`` lists the commands; ``flare23 COMMAND --help``
(or ``-h``) prints the command's usage, flags and defaults (fire's help text; for ``segment`` also
the pipeline bundle's ids with their defaults) and exits 0.
"""

from __future__ import annotations

import logging
import sys
import warnings


def _commands() -> dict:
    from flare23.data.crop import crop_cli, roi_labels_cli
    from flare23.data.datalists import datalist_cli
    from flare23.data.fingerprint import fingerprint_cli
    from flare23.data.labels import merge_labels_cli
    from flare23.evaluation.evaluate import evaluate_cli
    from flare23.inference.calibrate import calibrate_cli
    from flare23.inference.segment import pack_cli, segment_cli
    from flare23.tools.phantoms.generate import phantoms_cli
    from flare23.tools.quickstart import quickstart_cli

    return {
        "phantoms": phantoms_cli,
        "merge-labels": merge_labels_cli,
        "roi-labels": roi_labels_cli,
        "crop": crop_cli,
        "fingerprint": fingerprint_cli,
        "datalist": datalist_cli,
        "evaluate": evaluate_cli,
        "segment": segment_cli,
        "pack": pack_cli,
        "calibrate": calibrate_cli,
        "quickstart": quickstart_cli,
    }


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning) -> None:
    """User warnings as one line ``flare23: warning: <message>``; other categories as Python prints them."""
    if category is not UserWarning:
        _default(message, category, filename, lineno, file, line)
        return
    stream = file if file is not None else sys.stderr
    try:
        print(f"flare23: warning: {' '.join(str(message).split())}", file=stream, flush=True)
    except OSError:  # stderr closed: warnings are not worth a crash
        pass


class _OneLineHandler(logging.StreamHandler):
    """Log records of WARNING and above as ``flare23: warning|error: <message>`` on one line, without tracebacks.

    ERROR records of ``ignite.*`` (the engine's "run is terminating due to exception: ...") and of
    ``flare23.inference`` (a failing case, which the inferer prints itself as ``flare23: error:``)
    are dropped: in the command line those reach the user once, as the per-case lines and the
    final error that :func:`main` prints.
    """

    SILENT_ERRORS = ("ignite", "flare23.inference")

    def __init__(self):
        super().__init__(sys.stderr)
        self.setLevel(logging.WARNING)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and any(
            record.name == n or record.name.startswith(n + ".") for n in self.SILENT_ERRORS
        ):
            return False
        return super().filter(record)

    def format(self, record: logging.LogRecord) -> str:
        level = "error" if record.levelno >= logging.ERROR else "warning"
        return f"flare23: {level}: {' '.join(record.getMessage().split())}"


def _setup_output() -> None:
    """One-line warnings and log records on stderr (only where nothing configured logging before)."""
    warnings.showwarning = _show_warning
    root = logging.getLogger()
    if not any(isinstance(h, _OneLineHandler) for h in root.handlers) and not root.handlers:
        root.addHandler(_OneLineHandler())


HELP_FLAGS = ("-h", "--help")


def _wants_help(args: list[str]) -> bool:
    """``-h`` / ``--help`` among ``args`` (before a ``--`` that ends the flags)."""
    head = args[: args.index("--")] if "--" in args else args
    return any(a in HELP_FLAGS for a in head)


def command_help(name: str, command) -> str:
    """The help of one command: fire's text (usage, flags with their defaults, docstring)."""
    from fire import helptext, trace

    text = helptext.HelpText(command, trace=trace.FireTrace(command, name=f"flare23 {name}"))
    text = text.replace(f"'flare23 {name}'", f"flare23 {name}")
    if name == "segment":
        from flare23.inference.segment import pipeline_ids_help

        try:
            text += "\n\n" + pipeline_ids_help()
        except Exception as exc:  # noqa: BLE001 - the help itself must print
            text += f"\n\n(the pipeline bundle's ids are not listed: {exc})"
    return text


def overview(commands: dict) -> str:
    """``flare23 --help``: the commands with the first line of their docstrings."""
    width = max(len(n) for n in commands)
    lines = ["usage: flare23 COMMAND [ARGS] (flare23 COMMAND --help for each command)", "", "commands:"]
    for name, fn in commands.items():
        first = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        lines.append(f"  {name:<{width}}  {first}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import difflib

    import fire

    _setup_output()

    from flare23.errors import Flare23Error

    argv = sys.argv[1:] if argv is None else list(argv)
    commands = _commands()
    if argv and argv[0] in commands:  # fire would not accept "merge-labels" as a dict key name
        name, command, rest = argv[0], commands[argv[0]], argv[1:]
        if _wants_help(rest):
            print(command_help(name, command))
            return
    elif not argv or argv[0] in HELP_FLAGS:
        print(overview(commands))
        return
    else:
        if not argv[0].startswith("-") and argv[0].replace("_", "-") not in commands:
            close = difflib.get_close_matches(argv[0], list(commands), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (one of {', '.join(commands)})"
            print(f"flare23: error: no command {argv[0]!r}{hint}", file=sys.stderr)
            sys.exit(2)
        name, command, rest = "", {k.replace("-", "_"): v for k, v in commands.items()}, argv
    try:
        fire.Fire(command, command=rest, name=f"flare23 {name}".strip())
    except Flare23Error as exc:
        print(f"flare23: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("flare23: interrupted", file=sys.stderr)
        sys.exit(130)
