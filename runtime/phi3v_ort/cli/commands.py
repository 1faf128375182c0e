"""The `phi3v-ort` command line: parse, call the library, print. Expected failures are one sentence on stderr."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import click

from phi3v_ort import __version__
from phi3v_ort.errors import Phi3vError


class Phi3vCommand(click.Command):
    """A command that turns an expected failure into `Error: <one sentence>` on its own too (scripts/fetch_model.py
    runs `fetch` outside the group, under the script's name)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Phi3vError as exc:
            raise click.ClickException(str(exc)) from None


class Phi3vGroup(click.Group):
    """Turns every expected failure into `Error: <one sentence>` and a non-zero exit, never a traceback; a bad
    option value too (click would print the usage block around it)."""

    command_class = Phi3vCommand

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Phi3vError as exc:
            raise click.ClickException(str(exc)) from None
        except click.UsageError as exc:
            if exc.ctx is not None and exc.ctx.command is not self and "--help" not in (exc.ctx.args or []):
                raise click.ClickException(exc.format_message()) from None
            raise


@click.group(cls=Phi3vGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="phi3v-ort")
def cli() -> None:
    """Run Phi-3-vision locally on ONNX Runtime GenAI: ask about images, chat, batch, serve.

    Without --model-dir or -m, commands use $PHI3V_ORT_MODEL or phi-3-vision, fetched from the Hugging Face hub on
    first use (the GPU int4 build with an NVIDIA GPU, the CPU int4 build otherwise; `phi3v-ort models` shows what
    is on disk).

    \b
    Examples:
      phi3v-ort run -i chart.png "Could you please introduce this stock to me?"
      phi3v-ort chat -i cover.jpg
      phi3v-ort serve --port 8000        # then open http://127.0.0.1:8000/
      phi3v-ort COMMAND --help           # a command's options and examples
    Shell completion (bash): eval "$(_PHI3V_ORT_COMPLETE=bash_source phi3v-ort)"
    """


def model_options(f: Callable) -> Callable:
    f = click.option("--device", default="auto", show_default=True,
                     help="auto (CUDA only when an NVIDIA GPU is really there), cuda or cpu.")(f)
    f = click.option("--model-dir", type=click.Path(), default=None,
                     help="A Phi-3-vision ONNX package folder (with genai_config.json).")(f)
    f = click.option("-m", "--model", default=None, metavar="NAME",
                     help="A catalog name (phi-3-vision, phi-3.5-vision, optionally :gpu-int4/:cpu-int4), found on "
                     "disk or fetched on first use [default: $PHI3V_ORT_MODEL or phi-3-vision].")(f)
    return f


def open_model(model: str | None, model_dir: str | None, device: str, policy=None, threads: int | None = None,
               phase=None):
    """The one way the commands get a loaded model (`phase`: a phase.Phase told when loading starts)."""
    from phi3v_ort.package.fetch import resolve_model_dir
    from phi3v_ort.engine.kv_cache import KVCachePolicy
    from phi3v_ort.package.loading import load_model

    folder = resolve_model_dir(model, model_dir, device)  # may fetch, with the hub client's own progress
    if phase is not None:
        phase.show("loading the model")
    return load_model(folder, device=device, policy=policy or KVCachePolicy(), threads=threads)


def note_cuda_graph(cuda_graph: bool, device: str) -> None:
    """--cuda-graph applies to CUDA only: on the CPU it is ignored, and said so."""
    if cuda_graph and device != "cuda":
        click.echo(f"Note: --cuda-graph is ignored: the model runs on the {device.upper()}.", err=True)


def start_workers(model: str | None, model_dir: str | None, device: str, workers: int, threads: int | None,
                  processor: str = "own", crops: int | None = None):
    """The model in `workers` worker processes (the CPU threads divided among them), and this process's input
    pipeline for the same package: the one way batch and serve get them."""
    from phi3v_ort.package.device import gpu_count, resolve_device
    from phi3v_ort.package.fetch import resolve_model_dir
    from phi3v_ort.inputs.pipeline import make_pipeline
    from phi3v_ort.engine.kv_cache import KVCachePolicy
    from phi3v_ort.package.loading import default_threads, open_inputs, read_package
    from phi3v_ort.workers.pool import WorkerPool, WorkerSpec

    info = read_package(resolve_model_dir(model, model_dir, device))
    pipeline = make_pipeline(open_inputs(info), processor, crops)  # refuses a bad --crops before any worker starts
    resolved = resolve_device(device)
    threads = threads or (default_threads(workers) if resolved == "cpu" else None)
    spec = WorkerSpec(str(info.path), resolved, KVCachePolicy(), threads)
    pool = WorkerPool(spec, workers, gpus=gpu_count() if resolved == "cuda" else 0).start()
    return pool, pipeline


def input_options(f: Callable) -> Callable:
    """--crops and --processor: how images and the prompt become the model's inputs (inputs.make_pipeline)."""
    f = click.option("--processor", type=click.Choice(["own", "og"]), default="own", show_default=True,
                     help="own: the runtime's pipeline, identical to the model's reference processor (BOS, "
                     "global view, crop budget, safe prompts); og: onnxruntime-genai's processor, for comparison.")(f)
    f = click.option("--crops", type=click.IntRange(1, 16), default=None,
                     help="Crop budget per image, 1-16 [default: 16, as the release]: fewer crops, fewer image "
                     "tokens, faster prefill, less detail.")(f)
    return f


def threads_option(f: Callable) -> Callable:
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="Intra-op threads per model session on the CPU [default: the CPUs this process may "
                        "use, divided among workers].")(f)


def sampling_options(f: Callable) -> Callable:
    for decorator in reversed([
        click.option("--max-new-tokens", type=int, default=512, show_default=True, metavar="N",
                     help="The most tokens the answer may have (it also ends at the end token or the context)."),
        click.option("--temperature", type=float, default=None,
                     help="Sample with this temperature (greedy if no sampling option is given)."),
        click.option("--top-p", type=float, default=None, metavar="P",
                     help="Sample from the smallest set of likeliest tokens whose probabilities add up to P "
                     "(0 < P <= 1)."),
        click.option("--top-k", type=int, default=None, metavar="K", help="Sample from the K likeliest tokens."),
        click.option("--seed", type=int, default=None, help="Seed of the sampler (0 to 2^31-1)."),
    ]):
        f = decorator(f)
    return f


def guidance_options(f: Callable) -> Callable:
    """Structured output (guidance.py): at most one of --json-schema, --json-object, --regex, --grammar."""
    for decorator in reversed([
        click.option("--json-schema", "json_schema", default=None, metavar="FILE_OR_JSON",
                     help="Constrain the answer to JSON following this schema (a file, or inline JSON starting "
                     "with '{'); the runtime adds only compact whitespace (see README, Structured output)."),
        click.option("--json-object", "json_object", is_flag=True, help="Constrain the answer to a JSON object."),
        click.option("--regex", "regex", default=None, metavar="PATTERN",
                     help="Constrain the answer to match PATTERN (\\d means [0-9])."),
        click.option("--grammar", "grammar", default=None, metavar="FILE.lark",
                     help="Constrain the answer to a Lark grammar (llguidance's Lark dialect)."),
    ]):
        f = decorator(f)
    return f


def make_settings(max_new_tokens: int, temperature: float | None, top_p: float | None, top_k: int | None,
                  seed: int | None, guidance=None):
    """Greedy unless a sampling option is given: the one place the CLI builds GenerationSettings. `guidance`: the
    output constraint (guidance.from_cli), checked here before any model is loaded as far as that can be."""
    from phi3v_ort.engine.settings import GenerationSettings

    sampling = {k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)) if v is not None}
    return GenerationSettings(max_new_tokens=max_new_tokens, do_sample=bool(sampling), seed=seed, guidance=guidance,
                              **sampling)


@cli.command(short_help="Ask a question about images; the answer streams to stdout.")
@click.argument("question")
@click.option("-i", "--image", "images", multiple=True, metavar="PATH|URL|-",
              help="An image to ask about (repeatable; '-' reads stdin).")
@model_options
@sampling_options
@click.option("--system", default=None, help="A system message put before the question.")
@input_options
@threads_option
@click.option("--no-share-buffer", is_flag=True, help="Let the KV cache grow per token instead of one static buffer.")
@click.option("--cuda-graph", is_flag=True, help="Capture CUDA graphs for decoding (CUDA only; ignored, and said "
              "so, on the CPU).")
@click.option("--stats", "show_stats", is_flag=True, help="Print timing and memory stats on stderr after the answer.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming: text, token_ids, "
              "prompt_tokens, num_image_tokens, finish_reason (parsed with a constraint), stats.")
@guidance_options
def run(question: str, images: tuple[str, ...], model: str | None, model_dir: str | None, device: str,
        max_new_tokens: int,
        temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None, system: str | None,
        crops: int | None, processor: str, threads: int | None, no_share_buffer: bool, cuda_graph: bool,
        show_stats: bool, as_json: bool, json_schema: str | None, json_object: bool, regex: str | None,
        grammar: str | None) -> None:
    """Ask QUESTION about zero or more images; the answer streams to stdout.

    On a terminal, a phase line on stderr says what is happening until the answer starts (preparing image, reading
    image (N tokens)); nothing of it when stderr is not a terminal.

    \b
    Examples:
      phi3v-ort run -i chart.png "Could you please introduce this stock to me?"
      phi3v-ort run -i a.jpg -i b.jpg "What is difference in this two images?"
      phi3v-ort run -i https://example.com/cover.jpg --stats "Who wrote this book?"
      cat photo.png | phi3v-ort run -i - --json "Describe the image."
      phi3v-ort run --model-dir tests/fixtures/tiny-int4-cpu -i tests/data/chart.png --max-new-tokens 32 "Hi"
    """
    from phi3v_ort.engine import guidance
    from phi3v_ort.engine.generation import Finished, prepare as prepare_inputs, stream_prepared
    from phi3v_ort.inputs.images import load_image
    from phi3v_ort.engine.kv_cache import KVCachePolicy
    from phi3v_ort.cli.phase import Phase, preparing, reading

    settings = make_settings(max_new_tokens, temperature, top_p, top_k, seed,
                             guidance.from_cli(json_schema, json_object, regex, grammar))
    policy = KVCachePolicy(share_buffer=not no_share_buffer, cuda_graph=cuda_graph)
    if images.count("-") > 1:
        raise Phi3vError("stdin ('-') can be given as an image only once")
    loaded_images = [load_image(src) for src in images]
    phase = Phase(sys.stderr)  # only when stderr is a terminal
    try:
        loaded = open_model(model, model_dir, device, policy, threads, phase=phase)
        if cuda_graph and loaded.device != "cuda":
            phase.clear()
            note_cuda_graph(cuda_graph, loaded.device)
    except BaseException:
        phase.clear()
        raise

    out = sys.stdout
    finished = None
    try:
        with prefill_interruptible():
            phase.show(preparing(len(loaded_images)))
            prepared = prepare_inputs(loaded, question, loaded_images, system, processor, crops)
            phase.show(reading(prepared.image_tokens, prepared.prompt_tokens))
            events = stream_prepared(loaded, prepared, settings)
            first = next(events)  # the prefill: og holds the GIL until it returns (so the phase line is static)
        phase.clear()  # the first token is here: the answer replaces the phase line
        for event in itertools.chain([first], events):
            if isinstance(event, Finished):
                finished = event
            elif not as_json and event.text:
                out.write(event.text)
                out.flush()
    except KeyboardInterrupt:
        phase.clear()
        if not as_json:
            out.write("\n")
            out.flush()
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    finally:
        phase.clear()

    assert finished is not None
    result = guidance.outcome(settings.guidance, finished.text, finished.stats.finish_reason,
                              finished.stats.generated_tokens)
    if as_json:
        # one name per fact: the counts and the finish reason at the top level (as `prepare --json` names them),
        # timings and memory in stats
        stats = {k: v for k, v in finished.stats.to_dict().items()
                 if k not in ("prompt_tokens", "image_tokens", "finish_reason")}
        click.echo(json.dumps({
            "text": finished.text,
            "token_ids": list(finished.token_ids),
            "prompt_tokens": finished.stats.prompt_tokens,
            "num_image_tokens": list(finished.stats.image_tokens),
            "finish_reason": finished.stats.finish_reason,
            **({"parsed": result.parsed} if result.has_parsed else {}),
            "stats": stats,
        }, ensure_ascii=False))
    else:
        out.write("\n")
        out.flush()
    if show_stats:
        click.echo(format_stats(finished.stats), err=True)
    if not result.complete:  # a constrained answer that is not complete is never passed off as fine
        raise Phi3vError(result.problem)


@cli.command(short_help="Show the prompt and token counts the model would get.")
@click.argument("question")
@click.option("-i", "--image", "images", multiple=True, metavar="PATH|URL|-",
              help="An image (repeatable; '-' reads stdin).")
@model_options
@click.option("--system", default=None, help="A system message put before the question.")
@input_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: prompt, input_ids, image_sizes, "
              "num_image_tokens, prompt_tokens.")
@click.option("--save-pixels", type=click.Path(), default=None, metavar="FILE.npy",
              help="Write pixel_values as a .npy file.")
def prepare(question: str, images: tuple[str, ...], model: str | None, model_dir: str | None, device: str,
            system: str | None, crops: int | None, processor: str, as_json: bool, save_pixels: str | None) -> None:
    """Show what the model will see for QUESTION and the images, without generating.

    Counts an image's cost (prompt and image tokens) before a long job; needs only the package's files (with the
    default --processor own).

    \b
    Examples:
      phi3v-ort prepare -i chart.png "Could you please introduce this stock to me?"
      phi3v-ort prepare -i chart.png --crops 4 --json "Describe the chart."
      phi3v-ort prepare -i chart.png --save-pixels pixels.npy "Describe the chart."
    """
    from phi3v_ort.package.fetch import resolve_model_dir
    from phi3v_ort.engine.generation import prepare as prepare_inputs
    from phi3v_ort.inputs.images import load_image
    from phi3v_ort.inputs.pipeline import make_pipeline
    from phi3v_ort.package.loading import open_inputs, read_package
    from phi3v_ort.inputs.prompt import build_prompt

    if images.count("-") > 1:
        raise Phi3vError("stdin ('-') can be given as an image only once")
    if save_pixels and not save_pixels.endswith(".npy"):
        raise Phi3vError("--save-pixels needs a file name ending in .npy")
    loaded_images = [load_image(src) for src in images]
    folder = resolve_model_dir(model, model_dir, device)
    if processor == "og":  # og's processor exists only in a loaded model
        inputs = prepare_inputs(open_model(None, str(folder), device), question, loaded_images, system, "og", crops)
    else:  # the runtime's own pipeline needs only the package's files
        pipeline = make_pipeline(open_inputs(read_package(folder)), processor, crops)
        inputs = pipeline.inputs(build_prompt(question, len(loaded_images), system),
                                 [pipeline.prepare_image(img) for img in loaded_images])
    if save_pixels:
        _save_npy(save_pixels, inputs.pixel_values)
    sizes = inputs.image_sizes.tolist() if inputs.image_sizes is not None else []
    if as_json:
        click.echo(json.dumps({"prompt": inputs.prompt, "input_ids": inputs.input_ids[0].tolist(),
                               "image_sizes": sizes, "num_image_tokens": list(inputs.image_tokens),
                               "prompt_tokens": inputs.prompt_tokens}, ensure_ascii=False))
        return
    click.echo(f"prompt tokens      {inputs.prompt_tokens} (image tokens: "
               f"{', '.join(map(str, inputs.image_tokens)) or 'none'})")
    for img, (h, w) in zip(loaded_images, sizes):
        click.echo(f"image              {img.source}: {img.width}x{img.height} -> {w}x{h} "
                   f"({h // 336 * (w // 336)} crops + the global view)")
    if inputs.pixel_values is not None:
        click.echo(f"pixel_values       {list(inputs.pixel_values.shape)} {inputs.pixel_values.dtype}")
    click.echo(f"processor          {processor}")


def _save_npy(path: str, array) -> None:
    """Write atomically: a failure never leaves a half-written file where another was."""
    import numpy as np

    from phi3v_ort.errors import Phi3vError as _Error

    if array is None:
        raise _Error("there are no pixels to save: give at least one image with -i")
    target = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(target):
        raise _Error(f"cannot write {path}: it is a folder")
    tmp = f"{target}.tmp-{os.getpid()}.npy"
    try:
        np.save(tmp, array)
        os.replace(tmp, target)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise _Error(f"cannot write {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def prefill_interruptible():
    """og 0.18 holds the GIL for a whole prefill (minutes for the real model on a CPU), so Python's Ctrl-C handler
    would run only when it returns. During the prefill of `run` there is no answer yet to keep, so Ctrl-C there
    ends the process at once (the signal's default action; the shell reports 130), and Python's handler is back
    for the answer (which keeps the partial text). Only in the main thread, where signals can be set."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not \
            signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def format_stats(stats) -> str:
    images = ", ".join(str(n) for n in stats.image_tokens) or "none"
    return "\n".join([
        f"prompt tokens      {stats.prompt_tokens} (image tokens: {images})",
        f"preprocessing      {stats.preprocess_s * 1000:.1f} ms",
        f"time to 1st token  {stats.time_to_first_token_s * 1000:.1f} ms "
        f"(prefill {stats.prefill_tokens_per_s:.1f} tokens/s)",
        f"decode             {stats.decode_tokens_per_s:.1f} tokens/s",
        f"generated          {stats.generated_tokens} tokens, finish reason: {stats.finish_reason}",
        f"KV cache           {stats.kv_cache_bytes / 2**20:.1f} MiB for max_length {stats.max_length} "
        f"({'shared buffer' if stats.share_buffer else 'growing'}"
        f"{', CUDA graph' if stats.cuda_graph else ''}, {stats.device})",
    ] + (["conversation       continued the kept KV cache (only this turn's tokens were prefilled)"]
         if stats.kv_reused else []) + ([f"conversation       re-prefilled: {stats.reprefill_reason}"]
                                        if stats.reprefill_reason else []))


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
    from importlib import metadata

    from phi3v_ort.package.device import gpu_count, resolve_device
    from phi3v_ort.package.fetch import hub_cache, locate, model_target

    versions = []
    for dist in ("phi3v-ort", "onnxruntime-genai-cuda", "onnxruntime-gpu", "numpy", "pillow", "click",
                 "huggingface-hub"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    gpus = gpu_count()
    tail = [f"GPU              {f'{gpus} NVIDIA GPU(s) found' if gpus else 'none found'}",
            f"versions         {', '.join(versions)}"]
    target = model_target(model, model_dir, device)
    folder = target if isinstance(target, Path) else None
    if folder is None:
        local = locate(target)
        if local.complete and local.path is not None:
            folder = local.path
        else:
            state = (f"on disk but not usable ({local.problem}): {local.path}" if local.path is not None
                     else "not on this machine")
            click.echo("\n".join([
                f"model            {target.label} ({target.note})",
                f"on disk          {state}",
                f"would fetch      {target.repo}/{target.folder} into {hub_cache()} (on first use by run, chat, "
                f"batch or serve, or now with: phi3v-ort fetch -m {target.model} --variant {target.name})",
                f"device           {resolve_device(device)} (the {target.name} build is chosen for it)",
                *tail]))
            return
    model = open_model(None, str(folder), device, threads=threads)
    i = model.info
    lines = [
        f"model folder     {i.path}",
        f"model type       {i.model_type}",
        f"files            {i.files.vision}, {i.files.embedding}, {i.files.decoder}",
        f"built for        {i.built_for} ({i.io_dtype} I/O)",
        f"loaded on        {model.device} (onnxruntime-genai reports {model.og_model.device_type})"
        + (f", {model.threads} intra-op thread(s) per session" if model.threads else ""),
        f"vision input     pixel_values [num_images, {model.builder.crop_slots or 'num_crops + 1'}, 3, 336, 336] "
        f"{model.builder.pixel_dtype.__name__}",
        f"decoder          {i.num_layers} layers, hidden {i.hidden_size}, {i.num_heads} heads of {i.head_size}, "
        f"{i.num_kv_heads} KV heads",
        f"context          {i.context_length} tokens, vocab {i.vocab_size}",
        *tail,
    ]
    click.echo("\n".join(lines))


@cli.command(short_help="Chat about images, keeping the KV cache between turns.")
@click.option("-i", "--image", "images", multiple=True, metavar="PATH|URL",
              help="An image for the first question (repeatable); later ones with /image.")
@model_options
@sampling_options
@click.option("--system", default=None, help="A system message for the whole conversation.")
@input_options
@threads_option
@click.option("--reserve-tokens", type=int, default=2048, show_default=True,
              help="KV-cache room kept for follow-up turns beyond the first answer.")
@guidance_options
def chat(images: tuple[str, ...], model: str | None, model_dir: str | None, device: str, max_new_tokens: int,
         temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None, system: str | None,
         crops: int | None, processor: str, threads: int | None, reserve_tokens: int, json_schema: str | None,
         json_object: bool, regex: str | None, grammar: str | None) -> None:
    """An interactive chat about images that keeps the KV cache between turns.

    Type a question per line; /help lists the commands (/image PATH, /detach, /reset, /stats, /format, /save FILE).
    Ctrl-C stops an answer, Ctrl-D leaves. When stdin is not a terminal, each line is a turn.

    \b
    Examples:
      phi3v-ort chat -i chart.png
      phi3v-ort chat --system "Answer in one sentence." -i cover.jpg
      printf 'What is this?\\nAnd the title?\\n' | phi3v-ort chat -i cover.jpg
    """
    from phi3v_ort.engine import guidance
    from phi3v_ort.cli.chat_loop import run_chat, stdin_is_terminal
    from phi3v_ort.engine.conversation import Conversation
    from phi3v_ort.inputs.images import load_image
    from phi3v_ort.cli.phase import Phase

    settings = make_settings(max_new_tokens, temperature, top_p, top_k, seed,
                             guidance.from_cli(json_schema, json_object, regex, grammar))
    loaded_images = [load_image(src) for src in images]
    phase = Phase(sys.stderr)  # only when stderr is a terminal
    try:
        loaded = open_model(model, model_dir, device, threads=threads, phase=phase)
    finally:
        phase.clear()
    conversation = Conversation(loaded, settings, system, reserve_tokens, processor=processor, crops=crops)
    sys.exit(run_chat(conversation, loaded_images, sys.stdin, sys.stdout, sys.stderr,
                      interactive=stdin_is_terminal(), format_stats=format_stats, phase=phase))


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
def batch(source: str, output: str, question: str | None, model: str | None, model_dir: str | None, device: str,
          max_new_tokens: int, temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None,
          crops: int | None, processor: str, workers: int, threads: int | None, prepare_threads: int, prefetch: int,
          retry_errors: bool, use_ray: bool, ray_address: str | None, actors: int | None,
          gpus_per_actor: float | None, cpus_per_actor: float | None, json_schema: str | None, json_object: bool,
          regex: str | None, grammar: str | None) -> None:
    """Answer SOURCE (a JSONL file or a folder of images), one JSON line per item in -o OUTPUT.

    SOURCE is a JSONL file of {"id", "images", "question"} lines (relative image paths are relative to it), or a
    folder of images with --question. OUTPUT is appended to: answered ids are skipped, so the same command resumes.
    Bad input lines are listed on stderr and the rest runs. Exit status: 0 every item is answered; 1 stopped by an
    Error line (bad paths or input are refused before any work); 3 some items failed (error lines in OUTPUT, from
    this run or kept by --no-retry-errors) or some input lines were bad; 130 interrupted (run it again to resume).

    \b
    Examples:
      phi3v-ort batch items.jsonl -o answers.jsonl
      phi3v-ort batch photos/ --question "Describe the image." -o answers.jsonl --workers 2
      phi3v-ort batch items.jsonl -o answers.jsonl --json-schema book.schema.json
      phi3v-ort batch /shared/photos --question "Describe the image." -o /shared/answers.jsonl --ray
    """
    import time

    from phi3v_ort.engine import guidance
    from phi3v_ort.batch.runner import check_output, read_batch, run_batch

    settings = make_settings(max_new_tokens, temperature, top_p, top_k, seed,
                             guidance.from_cli(json_schema, json_object, regex, grammar))
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
            raise Phi3vError(f"--ray needs Ray Data ({exc.name or exc} is missing): "
                             "pip install 'phi3v-ort[ray]'") from None
        distributed.check(output, source, ids, retry_errors)
    else:
        check_output(output, source, ids, retry_errors)
    for bad in data.bad:
        click.echo(f"Error: {data.describe(bad)}", err=True)
    if use_ray:
        p = _ray_batch(distributed, data, output, settings, model=model, model_dir=model_dir, device=device,
                       address=ray_address, actors=actors, gpus_per_actor=gpus_per_actor,
                       cpus_per_actor=cpus_per_actor, threads=threads, processor=processor, crops=crops,
                       retry_errors=retry_errors)
        _batch_summary(p, data, output)
        return
    pool, pipeline = start_workers(model, model_dir, device, workers, threads, processor, crops)
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
        unrun_note = f", {unrun} input lines could not be run (listed above)" if unrun else ""
        lost_note = (f", {p.unanswered} items got no line (Ray gave up on their actor after it died repeatedly)"
                     if p.unanswered else "")
        click.echo(f"Not complete: {p.failed + p.kept_failed} items have an error line in the output{unrun_note}"
                   f"{lost_note}; fix them and run the same command to retry.", err=True)
        sys.exit(3)


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
@click.option("--out", default="benchmarks/results/bench", show_default=True,
              help="Result path without extension (.json, .md, and .png when both engines ran).")
@input_options
@threads_option
def bench(model_dir: str, checkpoint: str | None, engines: str, scenarios: str | None, device: str, torch_dtype: str,
          torch_attn: str, reps: int, warmup: int, max_new_tokens: int, cuda_graph: bool, no_share_buffer: bool,
          out: str, crops: int | None, processor: str, threads: int | None) -> None:
    """Measure phi3v-ort against the transformers reference on the same weights.

    Each engine runs in its own process; the results go to OUT.json, OUT.md and OUT.png. The torch engine needs
    the build extra (pip install torch -e '.[build]') and a transformers checkpoint of the package's weights:
    scripts/make_synthetic_model.py writes one beside each package it builds (--out DIR: DIR.checkpoint). Exits
    non-zero when an engine fails.

    \b
    Examples:
      python scripts/make_synthetic_model.py --preset tiny --out models/tiny
      phi3v-ort bench --model-dir models/tiny --scenarios chart,text --reps 3
      phi3v-ort bench --model-dir models/tiny --engines ort --out /tmp/ort-only
    """
    import importlib.util

    from phi3v_ort.bench.harness import BenchConfig, run, write
    from phi3v_ort.bench.scenarios import DEFAULT_SCENARIOS
    from phi3v_ort.package.loading import read_package

    # everything is checked before anything runs (a full run takes minutes)
    engine_names = _choices(engines, BENCH_ENGINES, "--engines")
    names = _choices(scenarios, _bench_scenario_names(), "--scenarios") if scenarios is not None \
        else DEFAULT_SCENARIOS
    dtypes = _choices(torch_dtype, TORCH_DTYPES, "--torch-dtype")
    attn = _choices(torch_attn, TORCH_ATTN, "--torch-attn")
    read_package(model_dir)  # one sentence if it is not a package
    if "torch" in engine_names:
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise Phi3vError(f"the torch engine needs the build extra ({missing[0]} is missing): pip install "
                             "torch -e '.[build]', or measure phi3v-ort alone with --engines ort")
        checkpoint = checkpoint or str(Path(model_dir).resolve()) + ".checkpoint"
        if not (Path(checkpoint) / "config.json").is_file():
            raise Phi3vError(f"the torch engine needs a transformers checkpoint of the same weights and there is "
                             f"none at {checkpoint}: scripts/make_synthetic_model.py writes it next to the package "
                             "(--out DIR gives DIR.checkpoint); pass --checkpoint DIR, or use --engines ort")
    note_cuda_graph(cuda_graph, device)
    cfg = BenchConfig(model_dir=model_dir, checkpoint=checkpoint, engines=engine_names,
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
        click.echo("No chart: it compares the two engines (and needs matplotlib: pip install "
                   "'phi3v-ort[bench]').", err=True)
    if failed:
        raise Phi3vError("; ".join(f"{e['label']} failed ({e['error']}; its output is above)" for e in failed))


@cli.command(short_help="Serve an OpenAI-compatible API and a web page to try it.")
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The address to listen on (0.0.0.0: every interface; think of --api-key then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="The TCP port to listen on.")
@click.option("--api-key", default=None, envvar="PHI3V_ORT_API_KEY",
              help="Require `Authorization: Bearer KEY` on /v1 (also from $PHI3V_ORT_API_KEY).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model worker processes, each with its own model, one answer at a time each (worker i on GPU i "
              "when there are enough GPUs).")
@threads_option
@click.option("--processor", type=click.Choice(["own", "og"]), default="own", show_default=True,
              help="own: the runtime's input pipeline (the reference processor's behaviour); og: onnxruntime-genai's.")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests waiting for a worker; beyond: 429.")
@click.option("--allow-remote-images", is_flag=True, help="Accept http(s) image URLs (never to private addresses).")
@click.option("--model-name", default=None, help="The model id clients see [default: the catalog name or folder].")
@click.option("-q", "--quiet", is_flag=True, help="No access log (one line per request on stderr).")
def serve(model: str | None, model_dir: str | None, device: str, host: str, port: int, api_key: str | None,
          workers: int, threads: int | None, processor: str, max_queue: int, allow_remote_images: bool,
          model_name: str | None, quiet: bool) -> None:
    """An OpenAI-compatible server with a web page; the models run in worker processes.

    Serves a page to try the model in a browser at http://HOST:PORT/, /v1/chat/completions (streaming too),
    /v1/models and /health. Logs one line per request on stderr (method, path, status, prompt and completion
    tokens, time to first token, total time) unless --quiet.

    \b
    Examples:
      phi3v-ort serve                                  # then open http://127.0.0.1:8000/
      phi3v-ort serve --model-dir tests/fixtures/tiny-int4-cpu --port 8001
      phi3v-ort serve --host 0.0.0.0 --api-key s3cret --workers 2
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'
    """
    try:
        from phi3v_ort.server.app import ServerLimits, bind_socket, create_app, serve_forever
    except ImportError as exc:
        raise Phi3vError(f"serving needs the serve extra ({exc.name} is missing): pip install 'phi3v-ort[serve]'")
    sock = bind_socket(host, port)  # a port in use is one sentence now, before any model loads
    try:
        pool, _ = start_workers(model, model_dir, device, workers, threads, processor)
    except BaseException:
        sock.close()
        raise
    spec = pool.workers[0].spec
    name = model_name or model or Path(spec.model_dir).name
    limits = ServerLimits(max_queue=max_queue)
    app = create_app(pool, name, api_key, limits, allow_remote_images, processor=processor, access_log=not quiet)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving {name} ({spec.device}, {workers} worker(s)"
               f"{f', {spec.threads} thread(s) each' if spec.threads else ''}) on http://{shown}:{port}/v1 "
               f"(web page: http://{shown}:{port}/)", err=True)
    serve_forever(app, host, port, limits.grace_s, sock=sock)


@cli.command(short_help="List the published builds and which are on this machine.")
def models() -> None:
    """The catalog of published builds and what of it is already on this machine.

    \b
    Examples:
      phi3v-ort models
      HF_HUB_CACHE=/data/hub phi3v-ort models
    """
    from phi3v_ort.package.catalog import CATALOG
    from phi3v_ort.package.fetch import locate

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


@cli.command(short_help="Download a published build (resumable).")
@click.option("-m", "--model", default=None, metavar="NAME",
              help="phi-3-vision or phi-3.5-vision [default: $PHI3V_ORT_MODEL or phi-3-vision].")
@click.option("--variant", default=None,
              help="gpu-int4 or cpu-int4 [default: gpu-int4 when an NVIDIA GPU is present, else cpu-int4].")
@click.option("--revision", default=None, help="A branch, tag or commit of the hub repo [default: main].")
@click.option("--dir", "local_dir", type=click.Path(file_okay=False), default=None,
              help="Download into this plain folder instead of the hub cache.")
def fetch(model: str | None, variant: str | None, revision: str | None, local_dir: str | None) -> None:
    """Download a published build (resumable) and print the folder to pass as --model-dir.

    Goes to the Hugging Face hub cache ($HF_HUB_CACHE) unless --dir is given; an interrupted fetch resumes when run
    again.

    \b
    Examples:
      phi3v-ort fetch                                  # phi-3-vision, the build for this machine
      phi3v-ort fetch -m phi-3.5-vision --variant cpu-int4
      phi3v-ort fetch --variant cpu-int4 --dir models/
    """
    from phi3v_ort.package.catalog import DEFAULT_MODEL, MODEL_ENV, select
    from phi3v_ort.package.device import resolve_device
    from phi3v_ort.package.fetch import ensure

    chosen = select(model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL, variant, resolve_device("auto"))
    try:
        path = ensure(chosen, revision=revision, local_dir=local_dir)
    except KeyboardInterrupt:
        click.echo("Interrupted: what was downloaded is kept, and the same fetch resumes it.", err=True)
        sys.exit(130)
    click.echo(str(path))


@cli.command(name="export", short_help="Export a Phi-3(.5)-vision checkpoint (a fine-tune too) to ONNX.")
@click.option("--checkpoint", type=click.Path(), required=True, metavar="DIR",
              help="A checkpoint folder in the layout of microsoft/Phi-3-vision-128k-instruct or "
              "microsoft/Phi-3.5-vision-instruct (config.json, safetensors shards, tokenizer files).")
@click.option("--out", type=click.Path(), required=True, metavar="DIR", help="The package folder to write.")
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
def export_cmd(checkpoint: str, out: str, variant: str, adapter: str | None, family: str, check: bool,
               overwrite: bool, as_json: bool, threads: int | None) -> None:
    """Export a Phi-3-vision or Phi-3.5-vision checkpoint into the published ONNX release's layout.

    Vision and embedding models come from transformers' native classes (no remote code), the decoder from
    onnxruntime-genai's model builder. Then, unless --no-check, the package answers once about a built-in image
    and its logits are compared with the torch reference's (fp32: must agree to 1e-4 of the largest logit;
    int4 and fp16: the top-1 agreement over 32 greedy steps is reported). Needs the build extra
    (pip install torch -e '.[build]'). Exit 1 when the export fails or an fp32 check does not pass.

    \b
    Examples:
      phi3v-ort export --checkpoint ~/Phi-3-vision-128k-instruct --out models/my-cpu-int4
      phi3v-ort export --checkpoint ~/Phi-3.5-vision-instruct --adapter ./my-lora --variant gpu-int4 --out models/my-gpu
      phi3v-ort export --checkpoint ckpt --variant cpu-fp32 --out /tmp/exact --no-check
    """
    try:
        from phi3v_ort.export.exporter import ExportError, export_checkpoint
        from phi3v_ort.reference.model import CheckpointError
    except ImportError as exc:
        raise Phi3vError(f"export needs the build extra ({exc.name} is missing): pip install torch -e '.[build]'") \
            from None
    from phi3v_ort.export.adapter import AdapterError
    from phi3v_ort.export.decoder import BuilderError

    if adapter is not None and not Path(adapter).is_dir():
        raise Phi3vError(f"--adapter {adapter} is not a folder")
    try:
        result = export_checkpoint(checkpoint, out, variant, adapter=adapter, family=family, check=check,
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


def main() -> None:
    cli()  # click itself turns a Ctrl-C outside the generation loops into "Aborted!" (exit 1), no traceback
