"""flare23: fast abdominal organ and tumor segmentation in CT as MONAI bundles (FLARE 2023)."""

__version__ = "0.1.0"
