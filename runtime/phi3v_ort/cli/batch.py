"""`phi3v-ort batch`: a JSONL file or a folder of images answered into a JSONL file (locally or on Ray)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from phi3v_ort.cli.group import cli
from phi3v_ort.cli.options import (
    guidance_options,
    hands_settings,
    input_options,
    model_options,
    sampling_options,
    start_workers,
    threads_option,
    worker_memory_option,
)
from phi3v_ort.errors import Phi3vError, install_hint

if TYPE_CHECKING:
    from phi3v_ort.engine.settings import GenerationSettings


@cli.command(short_help="Answer a JSONL file or a folder of images into a JSONL file.")
@click.argument("source", type=click.Path())
@click.option("-o", "--output", type=click.Path(), required=True,
              help="JSONL results, appended; answered ids are skipped (resume), failed ones retried (with --ray, "
              "a path ending in .parquet is a folder of Parquet files).")
@click.option("--question", default=None,
              help="The question for every image of a folder (or the default for JSONL lines without one).")
@model_options
@sampling_options
@input_options
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model worker processes, each with its own model (and its share of the CPU threads).")
@threads_option
@worker_memory_option
@click.option("--prepare-threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="Threads decoding and preparing the next items' images while the workers generate.")
@click.option("--prefetch", type=click.IntRange(min=0), default=4, show_default=True,
              help="Items prepared ahead of the workers at most.")
@click.option("--retry-errors/--no-retry-errors", default=True, show_default=True,
              help="Run again the items whose last line in OUTPUT is an error (the new line replaces it).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Fan the items out to model actors on a Ray cluster (needs pip install 'phi3v-ort[ray]'); the "
              "same output lines, resumable the same way; OUTPUT may also be a .parquet folder.")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="The Ray cluster to join (--ray) [default: $RAY_ADDRESS, else a local Ray instance].")
@click.option("--actors", type=click.IntRange(min=1), default=None,
              help="Model actors, one model each (--ray) [default: one per GPU of the cluster, 1 without GPUs].")
@click.option("--gpus-per-actor", type=click.FloatRange(min=0), default=None, metavar="G",
              help="GPUs per actor (--ray; 0: CPU actors) [default: 1 when the cluster has GPUs, else 0].")
@click.option("--cpus-per-actor", type=click.FloatRange(min=0, min_open=True), default=None, metavar="C",
              help="Ray's CPU reservation per actor (--ray) [default: fractional, leaving a CPU to Ray Data].")
@guidance_options
@hands_settings
def batch(source: str, output: str, question: str | None, model: str | None, model_dir: str | None, device: str,
          settings: GenerationSettings, crops: int | None, processor: str, workers: int, threads: int | None,
          worker_memory_limit: str | None, prepare_threads: int, prefetch: int, retry_errors: bool, use_ray: bool,
          ray_address: str | None, actors: int | None, gpus_per_actor: float | None,
          cpus_per_actor: float | None) -> None:
    """Answer SOURCE (a JSONL file or a folder of images), one JSON line per item in -o OUTPUT.

    SOURCE is a JSONL file of {"id", "images", "question"} lines (relative image paths are relative to it), or a
    folder of images with --question. OUTPUT is appended to: answered ids are skipped, so the same command resumes.
    Bad input lines are listed on stderr and the rest runs. Exit status: 0 every item is answered; 1 stopped by an
    Error line (bad paths or input are refused before any work); 3 some items failed (error lines in OUTPUT, from
    this run or kept by --no-retry-errors) or some input lines were bad; 130 interrupted (run it again to resume).

    \b
    Examples:
      phi3v-ort batch items.jsonl -o answers.jsonl
      phi3v-ort batch examples/ --question "Describe the image." -o answers.jsonl --workers 2
      phi3v-ort batch items.jsonl -o answers.jsonl --json-schema book.schema.json
      phi3v-ort batch /shared/photos --question "Describe the image." -o /shared/answers.jsonl --ray
    """
    import time

    from phi3v_ort.batch.runner import check_output, read_batch, run_batch

    ray_only = [name for name, value in (("--ray-address", ray_address), ("--actors", actors),
                                         ("--gpus-per-actor", gpus_per_actor), ("--cpus-per-actor", cpus_per_actor))
                if value is not None]
    if ray_only and not use_ray:
        raise Phi3vError(f"{ray_only[0]} needs --ray")
    if use_ray and workers != 1:
        raise Phi3vError("--workers is for the local batch: with --ray, the model actors are --actors")
    if not use_ray and output.lower().rstrip("/").endswith(".parquet"):
        raise Phi3vError("a .parquet output needs --ray: the local batch writes JSONL (choose a .jsonl -o)")
    data = read_batch(source, question)
    ids = [it.id for it in data.items] + [b.id for b in data.bad if b.id is not None]
    if use_ray:
        try:
            from phi3v_ort.batch import on_ray as distributed
        except ImportError as exc:
            raise Phi3vError(f"--ray needs Ray Data ({exc.name or exc} is missing): {install_hint('ray')}") \
                from None
        distributed.check(output, source, ids, retry_errors)
    else:
        check_output(output, source, ids, retry_errors)
        from phi3v_ort.batch.output_lock import output_lock

        click.get_current_context().with_resource(output_lock(output))  # held until the command ends
    for bad in data.bad:
        click.echo(f"Error: {data.describe(bad)}", err=True)
    if use_ray:
        p = _ray_batch(distributed, data, output, settings, model=model, model_dir=model_dir, device=device,
                       address=ray_address, actors=actors, gpus_per_actor=gpus_per_actor,
                       cpus_per_actor=cpus_per_actor, threads=threads, processor=processor, crops=crops,
                       retry_errors=retry_errors)
        _batch_summary(p, data, output)
        return
    started = start_workers(model, model_dir, device, workers, threads, processor, crops, worker_memory_limit)
    pool, pipeline = started.pool, started.pipeline
    show = sys.stderr.isatty()

    def progress(p) -> None:
        elapsed = max(time.perf_counter() - p.started, 1e-9)
        line = (f"{p.done + p.failed}/{p.todo} items ({p.failed} failed), "
                f"{(p.done + p.failed) / elapsed:.2f} items/s, {p.tokens / elapsed:.1f} tokens/s")
        click.echo(("\r" + line) if show else line, err=True, nl=not show)

    try:
        p = run_batch(pool, pipeline, data.items, output, settings, prepare_threads=prepare_threads,
                      prefetch=prefetch, on_progress=progress, bad=data.bad, retry_errors=retry_errors)
    except KeyboardInterrupt:
        click.echo("\nInterrupted: finished items are in the output; run the same command to resume.", err=True)
        sys.exit(130)
    finally:
        pool.close()
    if show:
        click.echo("", err=True)
    _batch_summary(p, data, output)


def _batch_summary(p, data, output: str) -> None:
    """The last lines of a batch run, local or --ray, and its exit status (3 when something is missing)."""
    parts = [f"{p.retried} earlier errors retried"] if p.retried else []
    parts += [f"{p.kept_failed} earlier errors kept (--no-retry-errors)"] if p.kept_failed else []
    notes = f" ({'; '.join(parts)})" if parts else ""
    click.echo(f"{p.done} answered, {p.failed} failed, {p.skipped} already done: {output}{notes}", err=True)
    unrun = sum(1 for b in data.bad if b.id is None)
    if p.failed or p.kept_failed or unrun or p.unanswered:
        unrun_note = f", {_count(unrun, 'input line')} could not be run (listed above)" if unrun else ""
        lost_note = (f", {_count(p.unanswered, 'item')} got no line (Ray gave up on their actor after it died "
                     "repeatedly)" if p.unanswered else "")
        failed = p.failed + p.kept_failed
        click.echo(f"Not complete: {_count(failed, 'item')} {'has' if failed == 1 else 'have'} an error line in the "
                   f"output{unrun_note}{lost_note}; fix them and run the same command to retry.", err=True)
        sys.exit(3)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _ray_batch(distributed, data, output: str, settings, **options):
    """`batch --ray`: the job on the Ray cluster (Ray's own progress bars show it), Ctrl-C as in the local batch."""
    def started(info: dict) -> None:
        where = (f"{info['gpus_per_actor']:g} GPU each" if info["device"] == "cuda"
                 else f"CPU, {info['threads']} threads each")
        click.echo(f"Ray: {info['items']} items in {info['blocks']} blocks, {info['actors']} model actors ({where}, "
                   f"{info['cpus_per_actor']:g} CPU reserved each); cluster: {info['cluster_cpus']:g} CPUs, "
                   f"{info['cluster_gpus']:g} GPUs", err=True)

    try:
        return distributed.run_ray_batch(data, output, settings, on_start=started, **options)
    except KeyboardInterrupt:
        click.echo("\nInterrupted: finished items are in the output; run the same command to resume.", err=True)
        sys.exit(130)
