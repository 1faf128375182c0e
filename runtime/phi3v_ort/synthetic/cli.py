"""Command line of scripts/make_synthetic_model.py."""

from __future__ import annotations

import sys

import click

from .presets import PRESETS


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True,
              help="Model size: tiny (test fixture), small (CPU benchmarks), full (Phi-3-vision's real shape).")
@click.option("--precision", type=click.Choice(["int4", "fp32"]), default="int4", show_default=True,
              help="Decoder weights: int4 (MatMulNBits block 32, like the release) or fp32.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Target execution provider: cpu (fp32 I/O) or cuda (fp16 I/O, like the GPU release).")
@click.option("--names", type=click.Choice(["phi-3", "phi-3.5"]), default="phi-3", show_default=True,
              help="File names of Phi-3-vision or of Phi-3.5-vision.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Package folder to write.")
@click.option("--checkpoint-out", type=click.Path(file_okay=False), default=None,
              help="Where the transformers-style checkpoint goes [default: OUT.checkpoint].")
def main(preset: str, precision: str, provider: str, names: str, seed: int, out_dir: str,
         checkpoint_out: str | None) -> None:
    """Build a synthetic Phi-3-vision package that onnxruntime-genai loads as `phi3v`."""
    try:
        from .package import BuildOptions, build_package
    except ImportError as exc:  # torch / transformers / onnx missing
        raise click.ClickException(f"building needs the build extra ({exc.name} is missing): "
                                   "pip install -e '.[build]'") from None
    opts = BuildOptions(preset=preset, precision=precision, provider=provider, names=names, seed=seed)
    try:
        path = build_package(out_dir, opts, checkpoint_out)
    except (RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(str(path))


if __name__ == "__main__":
    main(sys.argv[1:])
