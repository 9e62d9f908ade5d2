"""`python -m stepdiff` is the `stepdiff` console script."""

from stepdiff.harness.cli import console_main

if __name__ == "__main__":
    console_main()
