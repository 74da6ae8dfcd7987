"""Evaluation with the FLARE 2023 rules: metrics, ignite handlers, folders and datalists."""
