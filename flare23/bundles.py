"""Reading the sub-bundles' configs, so that the pipeline reuses their definitions, never copies.

The pipeline bundle names three sibling bundles (``roi_extractor``, ``organ_seg``, ``tumor_seg``);
:class:`SubBundle` parses one of their configs with its own ``bundle_root`` and optional
overrides, and hands out parsed ids such as ``network_def``, ``target_spacing``, ``patch_size``,
``overlap`` or the normalisation parameters. Labels, spacings and network hyper-parameters thus
keep a single source of truth: the sub-bundle's config, which itself reads
:mod:`flare23.constants`.

No option is silently ignored: :func:`check_id` refuses an override that names an id the config
does not define (with the closest valid id), for the sub-bundles' overrides here, for
``flare23 segment``'s options, and, through :func:`refuse_unknown_ids` in the pipeline's
``initialize``, for ``python -m monai.bundle run`` (MONAI itself adds unknown ids silently).
Under ``python -m monai.bundle`` an uncaught error whose cause is a :class:`Flare23Error` is printed
as the one line ``flare23: error: <message>`` (:func:`install_excepthook`).
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path

from flare23.errors import Flare23Error

#: The project's ``bundles/`` folder beside the package (a clone run in place or installed with ``pip install -e .``).
PACKAGE_BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"


def bundle_folder(name: str, cwd: str | os.PathLike | None = None, argv: list[str] | None = None) -> str:
    """The default ``bundle_root`` of bundle ``name``'s configs: its folder, wherever MONAI is run from.

    Model Zoo bundles are run from their own folder with ``bundle_root`` ``.`` (the Zoo's commands, and its
    CI, which passes ``bundle_root`` itself), while this project's README runs every command from the
    repository root (``--config_file bundles/organ_seg/configs/train.json``). A fixed string serves only
    one of them, so each config's ``bundle_root`` is ``$flare23.bundles.bundle_folder('<name>')``:

    0. under ``python -m monai.bundle`` (or with ``argv``): the folder of the bundle whose ``configs/`` holds the
       first ``--config_file`` (``"."`` when that is ``cwd``), so a copied or renamed bundle uses its own files,
       never the project's (a pipeline copied elsewhere must read the sub-bundles beside *it*);
    1. ``cwd`` is the bundle's folder (named ``name``, with ``configs/metadata.json``): ``"."``;
    2. ``cwd`` holds ``bundles/<name>`` (the repository root): ``"bundles/<name>"``;
    3. else the ``bundles/<name>`` beside the installed package, as an absolute path;
    4. else ``"."`` (MONAI's own default: a missing file is then reported under ``./configs``).

    The first two are relative, as MONAI's own default is. A renamed bundle folder is found by rule 0 under
    ``python -m monai.bundle``; a program that parses a config itself passes ``bundle_root``. An explicit ``--bundle_root`` always wins over this default.
    """
    here = Path(cwd) if cwd is not None else Path.cwd()
    given = _config_file_bundle(argv)
    if given is not None:
        return "." if given.resolve() == here.resolve() else str(given)
    if here.resolve().name == name and (here / "configs" / "metadata.json").is_file():
        return "."
    if (here / "bundles" / name / "configs" / "metadata.json").is_file():
        return f"bundles/{name}"
    beside = PACKAGE_BUNDLES_DIR / name
    if (beside / "configs" / "metadata.json").is_file():
        return str(beside)
    return "."


def _closest(word: str, choices) -> str:
    match = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def check_id(parser, key: str, where: str) -> None:
    """Refuse ``key`` unless ``parser`` defines it: a top-level id, or a nested ``a#b`` path that exists.

    A nested path may also add an argument to a component (a dict with ``_target_``) that its
    target's signature takes (any name where it takes ``**kwargs``). The error names ``where``
    (the config or option) and the closest valid id.
    """
    key = str(key)
    if key in parser:
        return
    parent, _, last = key.rpartition("#")
    if not parent:
        raise Flare23Error(f"{where}: no id {key!r}{_closest(key, parser.config)}")
    if parent not in parser:
        check_id(parser, parent, where)  # names the first missing level
    container = parser[parent]
    if isinstance(container, dict) and "_target_" in container:
        accepted = _parameters(container["_target_"])
        if accepted is None or last in accepted:
            return
        raise Flare23Error(f"{where}: no id {key!r} ({container['_target_']} takes no {last!r}{_closest(last, accepted)})")
    if isinstance(container, dict):
        raise Flare23Error(f"{where}: no id {key!r}{_closest(last, container)}")
    what = f"a list of {len(container)} item(s)" if isinstance(container, list) else f"a {type(container).__name__}"
    raise Flare23Error(f"{where}: no id {key!r} ({parent!r} is {what})")


def _parameters(target) -> list[str] | None:
    """Keyword parameters of a component's dotted ``_target_``; None when unknown or it takes ``**kwargs``."""
    import inspect
    import pydoc

    if not isinstance(target, str) or "." not in target or target.startswith(("$", "@")):
        return None
    try:
        obj = pydoc.locate(target)
        params = inspect.signature(obj).parameters.values() if obj is not None else None
    except (TypeError, ValueError, ImportError):
        return None
    if params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _flags(argv: list[str]) -> dict[str, str | bool]:
    """``--key value`` / ``--key=value`` / ``--flag`` pairs of a fire command line (positionals skipped)."""
    flags: dict[str, str | bool] = {}
    args = argv[: argv.index("--")] if "--" in argv else list(argv)
    k = 0
    while k < len(args):
        arg = args[k]
        if arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg[2:].partition("=")
            if eq:
                flags[key] = value
            elif k + 1 < len(args) and not args[k + 1].startswith("--"):
                flags[key], k = args[k + 1], k + 1
            else:
                flags[key] = True
        k += 1
    return flags


def _files(value) -> list[str]:
    """``--config_file`` as fire hands it over: one path, or a list written as a Python / JSON literal."""
    import ast

    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith(("[", "(")):
        try:
            return [str(v) for v in ast.literal_eval(text)]
        except (ValueError, SyntaxError):
            pass
    return [text]


def _run_parameters() -> set[str]:
    """The options of ``monai.bundle run`` that are not config ids (its own, create_workflow's, ConfigWorkflow's)."""
    import inspect

    from monai.bundle import ConfigWorkflow, scripts

    names = set()
    for fn in (scripts.run, scripts.run_workflow, scripts.create_workflow, ConfigWorkflow.__init__):
        names.update(p.name for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD)
    return names - {"self"}


def _command_line_flags(argv: list[str] | None = None) -> dict | None:
    """The ``--key value`` options of ``python -m monai.bundle``'s command line (``argv`` for tests), ``--args_file``'s
    entries under them; None when this process is not ``python -m monai.bundle`` and no ``argv`` is given."""
    if argv is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if getattr(spec, "name", "") != "monai.bundle.__main__":
            return None
        argv = sys.argv[1:]
    flags = _flags(list(argv))
    if flags.get("args_file") not in (None, True):
        from monai.bundle import ConfigParser

        flags = {**ConfigParser.load_config_file(str(flags["args_file"])), **flags}
    return flags


def _config_file_bundle(argv: list[str] | None = None) -> Path | None:
    """The bundle folder of the first ``--config_file`` that lies in one (``<bundle>/configs/<file>.json``)."""
    flags = _command_line_flags(argv)
    if flags is None or flags.get("config_file") in (None, True):
        return None
    for name in _files(flags["config_file"]):
        path = Path(name).expanduser()
        if path.parent.name == "configs" and (path.parent / "metadata.json").is_file():
            return path.parent.parent
    return None


def refuse_unknown_ids(argv: list[str] | None = None) -> None:
    """An ``initialize`` step: refuse a command-line override that names no id of the merged config files.

    ``python -m monai.bundle run ... --precison fp32`` adds the id ``precison`` and runs on (MONAI
    accepts any id). This step reads the command line of ``python -m monai.bundle`` (``argv``
    for tests), takes its ``--config_file`` (one file or a list, extra user files included) and
    ``--args_file``, and checks every other ``--key`` with :func:`check_id` against the ids those
    files define, nested ``a#b`` keys included. The parser itself cannot tell a file's id from an
    override once they are merged, so outside ``monai.bundle``'s command line (``flare23 segment``
    checks its options itself; a program passes its own overrides) it does nothing.
    """
    flags = _command_line_flags(argv)
    if flags is None or flags.get("config_file") in (None, True):
        return
    from monai.bundle import ConfigParser

    files = _files(flags["config_file"])
    parser = ConfigParser()
    parser.read_config(files)
    known = _run_parameters() | {"bundle_root"}
    for key in flags:
        if key.replace("-", "_") not in known:
            check_id(parser, key, f"--{key}: the config ({', '.join(Path(f).name for f in files)})")


def user_error_in(exc: BaseException | None) -> Flare23Error | None:
    """The :class:`Flare23Error` behind an exception that MONAI's config parser wrapped, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Flare23Error):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _excepthook(exc_type, exc, tb, _previous=None) -> None:
    cause = user_error_in(exc)
    if cause is None or os.environ.get("FLARE23_TRACEBACK"):
        if cause is not None:
            print(f"flare23: error: {cause}", file=sys.stderr, flush=True)
        (_previous or sys.__excepthook__)(exc_type, exc, tb)
        return
    print(f"flare23: error: {cause}", file=sys.stderr)
    print("flare23: (a user error; set FLARE23_TRACEBACK=1 for the full traceback)", file=sys.stderr, flush=True)


def install_excepthook(force: bool = False) -> bool:
    """Under ``python -m monai.bundle`` (or with ``force``): print a Flare23Error cause as one first line.

    MONAI wraps an error of a config expression in a ``RuntimeError`` whose traceback is some 80
    lines long, with the user's problem (a missing folder, a bad option) in the middle. A
    :class:`Flare23Error` is a complete message about the user's input, so only it is printed
    (plus a hint); ``FLARE23_TRACEBACK=1`` prints the line and then the whole traceback. Other
    errors keep Python's traceback. Installed once, only where the hook is still Python's own.
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if not force and getattr(spec, "name", "") != "monai.bundle.__main__":
        return False
    if getattr(sys.excepthook, "__name__", "") == "_flare23_excepthook":
        return True
    previous = sys.excepthook

    def _flare23_excepthook(exc_type, exc, tb):
        _excepthook(exc_type, exc, tb, previous)

    sys.excepthook = _flare23_excepthook
    return True



class SubBundle:
    """A parsed config of another bundle: ``SubBundle(path).get("network_def")``.

    ``overrides`` maps ids of the sub-bundle to new values, as on MONAI's command line: a key may
    name a nested id (``"network_def#strides"``). A dict value without ``_target_`` given for an id
    whose current content is a dict is *merged* into it, key by key and recursively:
    ``{"network_def": {"strides": [...]}}`` changes only the strides. That nested spelling is the
    one to use for ``$`` expressions when the overrides come through another config (the
    pipeline's ``*_overrides`` ids): MONAI's parser of that config cannot resolve an expression
    under a key that contains ``#`` (it splits the key into levels that do not exist), while it
    evaluates ``{"network_def": {"strides": "$flare23.constants.ORGAN_STRIDES_XYZ"}}`` in its own
    scope and hands the value over. A dict with ``_target_`` replaces the component whole.
    """

    def __init__(self, bundle_dir: str | Path, config: str = "inference.json", overrides: dict | None = None):
        from monai.bundle import ConfigParser

        self.bundle_dir = Path(bundle_dir)
        path = self.bundle_dir / "configs" / config
        if not path.is_file():
            raise Flare23Error(f"{path}: bundle config not found (is {self.bundle_dir} a bundle folder?)")
        self.parser = ConfigParser()
        self.parser.read_config(str(path))
        self.parser["bundle_root"] = str(self.bundle_dir)
        self.config_path = path
        if overrides is not None and not isinstance(overrides, dict):
            raise Flare23Error(f"{path}: overrides must be a dict of id: value, got {type(overrides).__name__} {overrides!r}")
        for key, value in (overrides or {}).items():
            self._apply(str(key), value)
        self._cache: dict = {}

    def _apply(self, key: str, value) -> None:
        """Set ``key`` to ``value``, merging a plain dict into a dict id (see the class docstring).

        An id that the config does not define is refused (:func:`check_id`), each sub-key of a merge too.
        """
        check_id(self.parser, key, f"{self.config_path} (overrides)")
        if isinstance(value, dict) and "_target_" not in value and key in self.parser:
            current = self.parser[key]
            if isinstance(current, dict):
                for sub, sub_value in value.items():
                    self._apply(f"{key}#{sub}", sub_value)
                return
        self.parser[key] = value

    def get(self, key: str, default=None):
        """The parsed content of ``key`` (instantiated for components), cached per key."""
        if key not in self._cache:
            if key not in self.parser:
                if default is not None:
                    return default
                raise Flare23Error(f"{self.bundle_dir}: config has no id {key!r}")
            self._cache[key] = self.parser.get_parsed_content(key, instantiate=True)
        return self._cache[key]

    def network(self):
        """A fresh instance of the bundle's ``network_def`` (not cached: each call builds one)."""
        return self.parser.get_parsed_content("network_def", lazy=False)

    def __repr__(self) -> str:
        return f"SubBundle({str(self.bundle_dir)!r})"
