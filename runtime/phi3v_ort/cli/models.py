"""`phi3v-ort models` and `phi3v-ort fetch`: the catalog, what is on disk, downloads."""

from __future__ import annotations

import os
import sys

import click

from phi3v_ort.cli.group import cli
from phi3v_ort.errors import Phi3vError


@cli.command(short_help="List the published builds and the local packages on this machine.")
def models() -> None:
    """The catalog of published builds and what of it is already on this machine, then the local packages: those
    of the models folder ($PHI3V_ORT_MODELS, default ~/.local/share/phi3v-ort/models), which -m NAME runs by name.

    \b
    Examples:
      phi3v-ort models
      HF_HUB_CACHE=/data/hub PHI3V_ORT_MODELS=/data/models phi3v-ort models
    """
    from phi3v_ort.package.catalog import CATALOG
    from phi3v_ort.package.fetch import locate
    from phi3v_ort.package.local import MODELS_ENV, list_local, models_dir

    for v in CATALOG:
        click.echo(f"{v.label:<32} {v.repo}/{v.folder}")
        click.echo(f"{'':<32} {v.note}")
        if v.legacy:
            click.echo(f"{'':<32} refused: not fetched or loaded by phi3v-ort")
            continue
        local = locate(v)
        if local.path is None:
            click.echo(f"{'':<32} not on this machine")
        else:
            state = "complete" if local.complete else f"INCOMPLETE ({local.problem})"
            click.echo(f"{'':<32} on disk: {local.path} ({local.size_bytes / 2**30:.2f} GB, {state})")
    packages = list_local()
    click.echo(f"\nLocal packages (-m NAME) in {models_dir()} (${MODELS_ENV}):"
               + ("" if packages else " none yet; export, fetch and make_synthetic_model.py put one there with "
                  "--name NAME"))
    for p in packages:
        state = p.variant if p.problem is None else f"NOT USABLE ({p.problem})"
        click.echo(f"{p.name:<32} {state}, {p.size_bytes / 2**30:.2f} GB: {p.path}")


@cli.command(short_help="Download a published build (resumable).")
@click.option("-m", "--model", default=None, metavar="NAME",
              help="phi-3-vision or phi-3.5-vision [default: $PHI3V_ORT_MODEL or phi-3-vision].")
@click.option("--variant", default=None,
              help="gpu-int4 or cpu-int4 [default: gpu-int4 when an NVIDIA GPU is present, else cpu-int4].")
@click.option("--revision", default=None, help="A branch, tag or commit of the hub repo [default: main].")
@click.option("--dir", "local_dir", type=click.Path(file_okay=False), default=None,
              help="Download into this plain folder instead of the hub cache.")
@click.option("--name", default=None, metavar="NAME",
              help="Make it the local package NAME (in the models folder, see `phi3v-ort models`): -m NAME runs it.")
def fetch(model: str | None, variant: str | None, revision: str | None, local_dir: str | None,
          name: str | None) -> None:
    """Download a published build (resumable) and print the folder to pass as --model-dir.

    Goes to the Hugging Face hub cache ($HF_HUB_CACHE) unless --dir or --name is given; an interrupted fetch
    resumes when run again.

    \b
    Examples:
      phi3v-ort fetch                                  # phi-3-vision, the build for this machine
      phi3v-ort fetch -m phi-3.5-vision --variant cpu-int4
      phi3v-ort fetch --variant cpu-int4 --dir models/
      phi3v-ort fetch --variant cpu-int4 --name phi3v-cpu     # then: phi3v-ort run -m phi3v-cpu ...
    """
    from phi3v_ort.package.catalog import DEFAULT_MODEL, MODEL_ENV, select
    from phi3v_ort.package.device import resolve_device
    from phi3v_ort.package.fetch import ensure, ensure_named

    if name and local_dir:
        raise Phi3vError("give either --dir or --name, not both")
    chosen = select(model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL, variant, resolve_device("auto"))
    try:
        path = (ensure_named(chosen, name, revision) if name else
                ensure(chosen, revision=revision, local_dir=local_dir))
    except KeyboardInterrupt:
        click.echo("Interrupted: what was downloaded is kept, and the same fetch resumes it.", err=True)
        sys.exit(130)
    click.echo(str(path))
