"""`phi3v-ort info`: what a package is and how it loads here (never downloads)."""

from __future__ import annotations

import click

from phi3v_ort.cli.group import cli
from phi3v_ort.cli.options import model_options, threads_option


@cli.command(short_help="What a model package is and how it loads here (never downloads).")
@model_options
@threads_option
def info(model: str | None, model_dir: str | None, device: str, threads: int | None) -> None:
    """What a package is and how it loads here, with versions and whether a GPU was found.

    A diagnostic: it never downloads. A catalog model that is not on disk is reported with what `run` or `fetch`
    would download, and where to.

    \b
    Examples:
      phi3v-ort info --model-dir tests/fixtures/tiny-int4-cpu
      phi3v-ort info                       # the default model: on disk, or what would be fetched
      phi3v-ort info -m phi-3.5-vision:cpu-int4
    """
    from phi3v_ort.package.report import info_lines

    click.echo("\n".join(info_lines(model, model_dir, device, threads)))
