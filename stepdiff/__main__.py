"""`python -m stepdiff` is the `stepdiff` console script."""

from stepdiff.harness.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
