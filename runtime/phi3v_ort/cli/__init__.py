"""The `phi3v-ort` command line (click): one module per command; `main` is the console script."""

from phi3v_ort.cli.commands import cli, main

__all__ = ["cli", "main"]
