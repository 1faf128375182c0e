"""`phi3v-ort export`: a checkpoint (+ LoRA) into the release's ONNX layout (the exporter: phi3v_ort.export)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from phi3v_ort.cli.group import cli
from phi3v_ort.cli.options import threads_option
from phi3v_ort.errors import Phi3vError, missing_extra


@cli.command(name="export", short_help="Export a Phi-3(.5)-vision checkpoint (a fine-tune too) to ONNX.")
@click.option("--checkpoint", type=click.Path(), required=True, metavar="DIR",
              help="A checkpoint folder in the layout of microsoft/Phi-3-vision-128k-instruct or "
              "microsoft/Phi-3.5-vision-instruct (config.json, safetensors shards, tokenizer files).")
@click.option("--out", type=click.Path(), default=None, metavar="DIR", help="The package folder to write.")
@click.option("--name", default=None, metavar="NAME", help="Instead of --out: write the local package NAME (in the "
              "models folder, see `phi3v-ort models`), which -m NAME then runs.")
@click.option("--variant", type=click.Choice(["gpu-int4", "cpu-int4", "gpu-fp16", "cpu-fp32"]), default="cpu-int4",
              show_default=True, help="The release variant: int4 (RTN block 32) for CUDA or the CPU, fp16 for "
              "CUDA, or fp32 (exact; for checking).")
@click.option("--adapter", type=click.Path(), default=None, metavar="DIR",
              help="A PEFT LoRA adapter folder, merged into the weights before the export.")
@click.option("--family", type=click.Choice(["auto", "phi-3", "phi-3.5"]), default="auto", show_default=True,
              help="The release whose file names to use (auto: config.json's _name_or_path).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run the package once and compare it with the torch reference on the same weights.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder (once the new package is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print the result (timings, peak memory, check) as JSON.")
@threads_option
def export_cmd(checkpoint: str, out: str | None, name: str | None, variant: str, adapter: str | None, family: str, check: bool,
               overwrite: bool, as_json: bool, threads: int | None) -> None:
    """Export a Phi-3-vision or Phi-3.5-vision checkpoint into the published ONNX release's layout.

    Vision and embedding models come from transformers' native classes (no remote code), the decoder from
    onnxruntime-genai's model builder. Then, unless --no-check, the package answers once about a built-in image
    and its logits are compared with the torch reference's (fp32: must agree to 1e-4 of the largest logit;
    int4 and fp16: the top-1 agreement over 32 greedy steps is reported). Needs the build extra
    (pip install 'phi3v-ort[build]'). Exit 1 when the export fails or an fp32 check does not pass.

    \b
    Examples:
      phi3v-ort export --checkpoint ~/Phi-3-vision-128k-instruct --out models/my-cpu-int4
      phi3v-ort export --checkpoint ~/Phi-3.5-vision-instruct --adapter ./my-lora --variant gpu-int4 --out models/my-gpu
      phi3v-ort export --checkpoint ckpt --variant cpu-fp32 --out /tmp/exact --no-check
      phi3v-ort export --checkpoint ~/my-finetune --name my-model   # then: phi3v-ort run -m my-model ...
    """
    try:
        from phi3v_ort.export.exporter import ExportError, export_checkpoint
        from phi3v_ort.reference.names import CheckpointError
    except ImportError as exc:
        raise missing_extra("export", "build", exc.name) from None
    from phi3v_ort.reference.lora import AdapterError
    from phi3v_ort.export.decoder import BuilderError

    from phi3v_ort.package.local import package_target

    out_dir = package_target(out, name)
    if adapter is not None and not Path(adapter).is_dir():
        raise Phi3vError(f"--adapter {adapter} is not a folder")
    try:
        result = export_checkpoint(checkpoint, out_dir, variant, adapter=adapter, family=family, check=check,
                                   overwrite=overwrite, threads=threads)
    except (ExportError, CheckpointError, AdapterError, BuilderError) as exc:
        raise Phi3vError(str(exc)) from None
    except OSError as exc:  # a full disk, a folder that cannot be written: the staging folder is already gone
        raise Phi3vError(f"the export stopped: {exc.strerror or exc}"
                         + (f" ({exc.filename})" if exc.filename else "")) from None
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        peak = f", peak memory {result.peak_pss_bytes / 2**30:.1f} GiB" if result.peak_pss_bytes else ""
        click.echo(f"exported {result.family} {result.variant} in {result.phases_s['export']:.0f}s{peak}", err=True)
        if result.check is not None:
            click.echo(result.check.summary(), err=True)
        click.echo(str(result.path))
    if result.check is not None and result.check.passed is False:
        raise Phi3vError(f"the check failed: the package at {result.path} does not match the torch reference")
