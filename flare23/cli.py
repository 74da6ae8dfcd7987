"""The ``flare23`` command line (``flare23 COMMAND --help`` for each command).

Commands are plain functions of the package modules, exposed with ``fire``. User errors
(:class:`~flare23.errors.Flare23Error`) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import sys


def _commands() -> dict:
    from flare23 import datatools, evaluation, phantoms, quickstart, segment

    return {
        "phantoms": phantoms.phantoms_cli,
        "merge-labels": datatools.merge_labels_cli,
        "roi-labels": datatools.roi_labels_cli,
        "crop": datatools.crop_cli,
        "fingerprint": datatools.fingerprint_cli,
        "datalist": datatools.datalist_cli,
        "evaluate": evaluation.evaluate_cli,
        "segment": segment.segment_cli,
        "pack": segment.pack_cli,
        "quickstart": quickstart.quickstart_cli,
    }


def main(argv: list[str] | None = None) -> None:
    import fire

    from flare23.errors import Flare23Error

    argv = sys.argv[1:] if argv is None else list(argv)
    commands = _commands()
    if argv and argv[0] in commands:  # fire would not accept "merge-labels" as a dict key name
        command, rest = commands[argv[0]], argv[1:]
    else:
        command, rest = {k.replace("-", "_"): v for k, v in commands.items()}, argv
    try:
        fire.Fire(command, command=rest, name="flare23")
    except Flare23Error as exc:
        print(f"flare23: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("flare23: interrupted", file=sys.stderr)
        sys.exit(130)
