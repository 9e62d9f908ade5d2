"""Harness: spec, data/model construction, environments, workers, diff engine, tolerances, signatures, CLI.

Knows tensors and specs; names frameworks only through the adapter registry.
"""
