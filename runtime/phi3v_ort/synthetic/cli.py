"""Command line of scripts/make_synthetic_model.py."""

from __future__ import annotations

import sys

import click

from phi3v_ort.errors import Phi3vError, missing_extra
from phi3v_ort.package.local import package_target
from phi3v_ort.synthetic.presets import PRESETS

VARIANT_NAMES = ("gpu-int4", "cpu-int4", "gpu-fp16", "cpu-fp32")
# --precision / --provider, the older way to name a variant
BY_PRECISION = {("int4", "cpu"): "cpu-int4", ("int4", "cuda"): "gpu-int4", ("fp32", "cpu"): "cpu-fp32",
                ("fp16", "cuda"): "gpu-fp16"}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True,
              help="Model size: tiny (test fixture), small (CPU benchmarks), full (Phi-3-vision's real shape).")
@click.option("--variant", type=click.Choice(VARIANT_NAMES), default=None,
              help="The release variant to export [default: cpu-int4, or what --precision/--provider name].")
@click.option("--precision", type=click.Choice(["int4", "fp16", "fp32"]), default=None,
              help="Decoder weights (with --provider, another way to name the variant).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Target execution provider: cpu (fp32 I/O) or cuda (fp16 I/O, like the GPU release).")
@click.option("--family", "--names", "family", type=click.Choice(["phi-3", "phi-3.5"]), default="phi-3",
              show_default=True, help="Checkpoint layout and file names of Phi-3-vision or of Phi-3.5-vision.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--check/--no-check", default=False, show_default=True,
              help="Compare the package with the torch reference after the export (as `phi3v-ort export` does).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Package folder to write.")
@click.option("--name", default=None, metavar="NAME", help="Instead of --out: write the local package NAME (in the "
              "models folder, see `phi3v-ort models`), which -m NAME then runs.")
@click.option("--checkpoint-out", type=click.Path(file_okay=False), default=None,
              help="Where the random checkpoint goes [default: OUT.checkpoint].")
def main(preset: str, variant: str | None, precision: str | None, provider: str | None, family: str, seed: int,
         check: bool, out_dir: str | None, name: str | None, checkpoint_out: str | None) -> None:
    """Write a random Phi-3-vision checkpoint in the real layout, then export it with `phi3v-ort export`'s code
    into a package that onnxruntime-genai loads as `phi3v`. Prints the package folder.

    \b
      python scripts/make_synthetic_model.py --preset tiny --out models/tiny-int4-cpu
      python scripts/make_synthetic_model.py --preset full --variant gpu-int4 --out models/full-int4-cuda
      python scripts/make_synthetic_model.py --preset small --name small-int4-cpu   # then: phi3v-ort run -m small-int4-cpu
    """
    if variant is None:
        key = (precision or "int4", provider or ("cuda" if precision == "fp16" else "cpu"))
        if key not in BY_PRECISION:
            raise click.UsageError(f"no release variant is {key[0]} on {key[1]}; choose one of "
                                   f"{', '.join(VARIANT_NAMES)} with --variant")
        variant = BY_PRECISION[key]
    elif precision or provider:
        raise click.UsageError("give either --variant or --precision/--provider, not both")
    try:
        from phi3v_ort.reference.names import CheckpointError
        from phi3v_ort.synthetic.package import BuildOptions, build_package
    except ImportError as exc:  # torch / transformers / onnx missing
        raise click.ClickException(str(missing_extra("building", "build", exc.name))) from None
    try:
        target = package_target(out_dir, name)
    except Phi3vError as exc:
        raise click.UsageError(str(exc)) from None
    opts = BuildOptions(preset=preset, variant=variant, family=family, seed=seed, check=check)
    try:
        result = build_package(target, opts, checkpoint_out)
    except (RuntimeError, OSError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from None
    if result.check is not None:
        click.echo(result.check.summary(), err=True)
    click.echo(str(result.path))


if __name__ == "__main__":
    main(sys.argv[1:])
