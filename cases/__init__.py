"""Bundled case files (TOML). `stepdiff run NAME` finds them by file name."""
