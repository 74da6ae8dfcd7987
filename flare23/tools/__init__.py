"""Tooling beside the method: phantoms, quickstart, report."""
