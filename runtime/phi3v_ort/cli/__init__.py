"""The `phi3v-ort` command line: one module per command (or group of commands), each registered on the click group
(group.py); options.py holds the options they share. The CLI parses, calls the library and prints."""

from phi3v_ort.cli import batch, bench, chat, export, info, models, prepare, ps, run, serve  # noqa: F401 (registers)
from phi3v_ort.cli.group import cli, main

__all__ = ["cli", "main"]
