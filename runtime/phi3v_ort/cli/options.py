"""Options shared by the commands (click decorators), and the one way a command gets a loaded model or workers."""

from __future__ import annotations

import functools
from collections.abc import Callable

import click


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
    from phi3v_ort.engine.model import load_model

    folder = resolve_model_dir(model, model_dir, device)  # may fetch, with the hub client's own progress
    if phase is not None:
        phase.show("loading the model")
    return load_model(folder, device=device, policy=policy or KVCachePolicy(), threads=threads)


def note_cuda_graph(cuda_graph: bool, device: str) -> None:
    """--cuda-graph applies to CUDA only: on the CPU it is ignored, and said so."""
    if cuda_graph and device != "cuda":
        click.echo(f"Note: --cuda-graph is ignored: the model runs on the {device.upper()}.", err=True)


def start_workers(model: str | None, model_dir: str | None, device: str, workers: int, threads: int | None,
                  processor: str = "own", crops: int | None = None, worker_memory_limit: str | None = None):
    """workers.start_workers: the model in worker processes and this process's side of the package, read once
    (imported when a command needs it, so the CLI starts without the runtime's imports)."""
    from phi3v_ort.workers.pool import start_workers as start

    return start(model, model_dir, device, workers, threads, processor, crops, worker_memory_limit)


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


def worker_memory_option(f: Callable) -> Callable:
    return click.option("--worker-memory-limit", default=None, metavar="SIZE",
                        help="Address space per model worker (8G, 6000M, none): a runaway request fails, not the "
                        "machine [default: 3/4 of the machine's memory on the CPU, none on CUDA].")(f)


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
    from phi3v_ort.engine import settings

    return settings.make_settings(max_new_tokens, temperature, top_p, top_k, seed, guidance)


SETTINGS_OPTIONS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "json_schema", "json_object", "regex",
                    "grammar")


def hands_settings(f: Callable) -> Callable:
    """Put under sampling_options and guidance_options: the command gets one ready `settings` (GenerationSettings)
    instead of their nine values, checked before the command runs (so before any model loads)."""
    @functools.wraps(f)
    def command(**kwargs):
        from phi3v_ort.engine import guidance

        v = {name: kwargs.pop(name) for name in SETTINGS_OPTIONS}
        constraint = guidance.from_cli(v["json_schema"], v["json_object"], v["regex"], v["grammar"])
        kwargs["settings"] = make_settings(v["max_new_tokens"], v["temperature"], v["top_p"], v["top_k"], v["seed"],
                                           constraint)
        return f(**kwargs)
    return command
