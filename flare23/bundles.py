"""Reading the sub-bundles' configs, so that the pipeline reuses their definitions, never copies.

The pipeline bundle names three sibling bundles (``roi_extractor``, ``organ_seg``, ``tumor_seg``);
:class:`SubBundle` parses one of their configs with its own ``bundle_root`` and optional
overrides, and hands out parsed ids such as ``network_def``, ``target_spacing``, ``patch_size``,
``overlap`` or the normalisation parameters. Labels, spacings and network hyper-parameters thus
keep a single source of truth: the sub-bundle's config, which itself reads
:mod:`flare23.constants`.
"""

from __future__ import annotations

from pathlib import Path

from flare23.errors import Flare23Error


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
        for key, value in (overrides or {}).items():
            self._apply(str(key), value)
        self._cache: dict = {}

    def _apply(self, key: str, value) -> None:
        """Set ``key`` to ``value``, merging a plain dict into a dict id (see the class docstring)."""
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
