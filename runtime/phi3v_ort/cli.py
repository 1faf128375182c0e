"""The `phi3v-ort` command line: parse, call the library, print. Expected failures are one sentence."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="phi3v-ort")
def cli() -> None:
    """Run Phi-3-vision locally on ONNX Runtime GenAI."""


def main() -> None:
    cli()
