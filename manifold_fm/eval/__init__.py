"""Evaluation: FID, geometry diagnostics, swap probes, plots."""
