"""`phi3v-ort bench`: phi3v-ort against the transformers reference (the suite itself: phi3v_ort.bench)."""

from __future__ import annotations

import click

from phi3v_ort.cli.group import cli
from phi3v_ort.cli.options import input_options, note_cuda_graph, threads_option
from phi3v_ort.errors import Phi3vError


BENCH_ENGINES = ("ort", "torch")
TORCH_DTYPES = ("fp32", "bf16", "fp16")
TORCH_ATTN = ("eager", "sdpa")


def _bench_scenario_names() -> tuple[str, ...]:
    from phi3v_ort.bench.scenarios import SCENARIOS  # dataclasses only: cheap enough for --help

    return tuple(SCENARIOS)


def _choices(value: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    """A comma-separated option value as a tuple, each item checked (one sentence naming the choices)."""
    items = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not items:
        raise Phi3vError(f"{option} is empty: choose from {', '.join(allowed)}")
    for item in items:
        if item not in allowed:
            raise Phi3vError(f"{option}: unknown value {item!r}: choose from {', '.join(allowed)}")
    return items


@cli.command(short_help="Measure phi3v-ort against the transformers reference.")
@click.option("--model-dir", type=click.Path(), required=True, help="The ONNX package to measure.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="The transformers checkpoint of the same weights, for the torch engine [default: "
              "MODEL_DIR.checkpoint, as scripts/make_synthetic_model.py writes it].")
@click.option("--engines", default="ort,torch", show_default=True,
              help="Comma-separated engines: ort (phi3v-ort), torch (the transformers reference).")
@click.option("--scenarios", default=None, metavar="NAMES",
              help=f"Comma-separated scenarios, from: {', '.join(_bench_scenario_names())} [default: all].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where both engines run.")
@click.option("--torch-dtype", default="fp32", show_default=True,
              help="Comma-separated dtypes of the torch engine: fp32, bf16, fp16.")
@click.option("--torch-attn", default="eager", show_default=True,
              help="Comma-separated attention kernels of the torch engine: eager, sdpa.")
@click.option("--reps", type=click.IntRange(min=1), default=5, show_default=True,
              help="Measured repetitions per scenario (median and p90 reported).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True,
              help="Unmeasured runs per scenario before the repetitions.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True, metavar="N",
              help="Tokens generated per run (the end token is ignored, so every run decodes N).")
@click.option("--cuda-graph", is_flag=True, help="phi3v-ort with CUDA graphs (CUDA only; ignored on the CPU).")
@click.option("--no-share-buffer", is_flag=True, help="phi3v-ort without the shared KV buffer.")
@click.option("--out", default=None, metavar="PATH",
              help="Result path without extension (.json, .md, and .png when both engines ran) [default: "
              "bench in the folder MODEL-DATE-TIME of $XDG_DATA_HOME/phi3v-ort/bench, else of "
              "~/.local/share/phi3v-ort/bench; the files are printed].")
@input_options
@threads_option
def bench(model_dir: str, checkpoint: str | None, engines: str, scenarios: str | None, device: str, torch_dtype: str,
          torch_attn: str, reps: int, warmup: int, max_new_tokens: int, cuda_graph: bool, no_share_buffer: bool,
          out: str | None, crops: int | None, processor: str, threads: int | None) -> None:
    """Measure phi3v-ort against the transformers reference on the same weights.

    Each engine runs in its own process; the results go to OUT.json, OUT.md and OUT.png (their paths are printed).
    The torch engine needs the build extra (pip install 'phi3v-ort[build]') and a transformers checkpoint of the
    package's weights: scripts/make_synthetic_model.py writes one beside each package it builds (--out DIR:
    DIR.checkpoint). An engine that cannot run here is skipped, with the reason on stderr; exits non-zero when an
    engine that ran failed, or when none can run.

    \b
    Examples:
      python scripts/make_synthetic_model.py --preset tiny --out models/tiny
      phi3v-ort bench --model-dir models/tiny --scenarios chart,text --reps 3
      phi3v-ort bench --model-dir models/tiny --engines ort --out /tmp/ort-only
    """
    from phi3v_ort.bench.harness import BenchConfig, run, write
    from phi3v_ort.bench.plan import default_out, plan_engines
    from phi3v_ort.bench.report import no_chart_reason
    from phi3v_ort.bench.scenarios import DEFAULT_SCENARIOS
    from phi3v_ort.package.loading import read_package

    # everything is checked before anything runs (a full run takes minutes)
    engine_names = _choices(engines, BENCH_ENGINES, "--engines")
    names = _choices(scenarios, _bench_scenario_names(), "--scenarios") if scenarios is not None \
        else DEFAULT_SCENARIOS
    dtypes = _choices(torch_dtype, TORCH_DTYPES, "--torch-dtype")
    attn = _choices(torch_attn, TORCH_ATTN, "--torch-attn")
    read_package(model_dir)  # one sentence if it is not a package
    plan = plan_engines(engine_names, model_dir, checkpoint)
    for reason in plan.skipped.values():
        click.echo(f"Skipped: {reason}.", err=True)
    out = out or str(default_out(model_dir))
    note_cuda_graph(cuda_graph, device)
    cfg = BenchConfig(model_dir=model_dir, checkpoint=plan.checkpoint, engines=plan.engines,
                      scenarios=names, device=device, torch_dtypes=dtypes,
                      torch_attn=attn, reps=reps, warmup=warmup,
                      max_new_tokens=max_new_tokens, cuda_graph=cuda_graph, share_buffer=not no_share_buffer, out=out,
                      threads=threads, processor=processor, crops=crops)
    result = run(cfg)
    paths = write(result, out)
    for path in paths:
        click.echo(str(path))
    failed = [e for e in result["engines"] if "error" in e]
    if not any(p.suffix == ".png" for p in paths) and not failed:
        click.echo(f"No chart: {no_chart_reason(result)}.", err=True)
    if failed:
        raise Phi3vError("; ".join(f"{e['label']} failed ({e['error']}; its output is above)" for e in failed))
