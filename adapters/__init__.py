"""Adapters: one module per framework plus the pure-PyTorch reference.

Each adapter runs inside a worker process in its framework's own environment. It knows its framework, the step
spec and the record format, and nothing about diffs, tolerances or reports. Modules here import their framework
lazily (inside functions) so that `stepdiff list` can read capabilities without importing any framework.
"""
