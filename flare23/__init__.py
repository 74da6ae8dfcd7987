"""flare23: fast abdominal organ and tumor segmentation in CT as MONAI bundles (FLARE 2023)."""

from flare23.bundles import install_excepthook as _install_excepthook

__version__ = "0.1.0"

# every bundle config imports flare23: under `python -m monai.bundle run` a user error is then one first line
_install_excepthook()
