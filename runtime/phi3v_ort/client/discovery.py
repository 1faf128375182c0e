"""Which server (if any) answers a `run` or `chat`: a running local one that serves the same package the same way
(`--server auto`), a given one (`--server URL`), or none (`--no-server`).

A server answers exactly as in-process generation would only when it loaded the same package folder the same way:
the device, the intra-op threads, the input processor and the KV-cache options are fixed when it starts, so a
command that asks for others cannot get them per request. `auto` then runs in-process and says why in one note;
with an explicit URL it is an error (the user named that server). Request limits (image count and size, sampling
ranges the OpenAI API bounds) are checked the same way, before anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from phi3v_ort.engine.settings import GenerationSettings
from phi3v_ort.errors import Phi3vError
from phi3v_ort.client import registry
from phi3v_ort.client.registry import ServerRecord

MAX_TEMPERATURE = 2.0  # OpenAI's range, which the server's request parser enforces
MAX_TOP_K = 100_000


@dataclass(frozen=True)
class Wanted:
    """What a command asks for that a server must honour. `model_dir`: resolved (None: not checked, for a URL
    given without --model-dir); device "auto" and threads None accept whatever the server chose."""

    model_dir: str | None
    device: str = "auto"
    threads: int | None = None
    processor: str = "own"
    share_buffer: bool = True
    cuda_graph: bool = False
    settings: GenerationSettings = GenerationSettings()
    image_bytes: tuple[int, ...] = field(default=())  # the size of each image as read


@dataclass(frozen=True)
class Choice:
    """Where to generate: `url` None is in-process; `note` says why a running server was not used."""

    url: str | None = None
    record: ServerRecord | None = None
    note: str | None = None
    started: bool = False  # started just now (--keep-alive)


def mismatch(wanted: Wanted, record: ServerRecord, api_key: str | None) -> str | None:
    """The first thing the server cannot honour, as a phrase ("--threads 2 (it runs 4 per worker)"); None when
    it answers exactly as in-process would."""
    if wanted.model_dir is not None and record.model_dir != wanted.model_dir:
        return f"--model-dir {wanted.model_dir} (it serves {record.model_dir})"
    if wanted.device != "auto" and wanted.device != record.device:
        return f"--device {wanted.device} (it runs on the {record.device.upper()})"
    if wanted.threads is not None and wanted.threads != record.threads:
        return f"--threads {wanted.threads} (it runs {record.threads or 'the default'} per worker)"
    if wanted.processor != record.processor:
        return f"--processor {wanted.processor} (it uses {record.processor})"
    if wanted.share_buffer != record.share_buffer:
        return "--no-share-buffer (it uses the shared KV buffer)"
    if wanted.cuda_graph and not record.cuda_graph:
        return "--cuda-graph (it does not capture CUDA graphs)"
    if record.api_key and not api_key:
        return "a request without an API key (give it with --api-key or $PHI3V_ORT_API_KEY)"
    return request_limits(wanted, record)


def request_limits(wanted: Wanted, record: ServerRecord) -> str | None:
    """What an OpenAI request to this server cannot carry."""
    settings = wanted.settings
    if settings.do_sample and settings.temperature > MAX_TEMPERATURE:
        return f"--temperature {settings.temperature:g} (the API takes at most {MAX_TEMPERATURE:g})"
    if settings.do_sample and settings.top_k > MAX_TOP_K:
        return f"--top-k {settings.top_k} (the API takes at most {MAX_TOP_K})"
    if record.max_tokens_limit is not None and settings.max_new_tokens > record.max_tokens_limit:
        return (f"--max-new-tokens {settings.max_new_tokens} (it answers at most {record.max_tokens_limit}: "
                "serve --max-tokens-limit)")
    if len(wanted.image_bytes) > record.max_images:
        return f"{len(wanted.image_bytes)} images (it takes at most {record.max_images} per request)"
    if any(n > record.max_image_bytes for n in wanted.image_bytes):
        return f"an image over {record.max_image_bytes / 2**20:g} MB (its limit)"
    if sum(n * 4 // 3 + 64 for n in wanted.image_bytes) + 65536 > record.max_body_bytes:
        return f"images over its {record.max_body_bytes / 2**20:g} MB request limit"
    return None


def choose(mode: str, wanted: Wanted, api_key: str | None = None, keep_alive_s: float | None = None) -> Choice:
    """`mode`: "auto", "off" or a server's URL. With a URL, what it cannot honour is a Phi3vError; with auto, a
    note and in-process (or, with `keep_alive_s`, a server started for this model when none can answer)."""
    if mode == "off":
        return Choice()
    if mode != "auto":
        return _given(mode, wanted, api_key)
    note = None
    for record in registry.running(wanted.model_dir):
        problem = mismatch(wanted, record, api_key)
        if problem is None:
            return Choice(url=record.url, record=record)
        note = note or (f"Note: the server at {record.url} for this model cannot honour {problem}: running "
                        "in-process.")
    if keep_alive_s is not None and wanted.model_dir is not None and wanted.share_buffer and not wanted.cuda_graph:
        from phi3v_ort.client.background import start_server

        record = start_server(wanted.model_dir, wanted.device, wanted.threads, wanted.processor, keep_alive_s)
        problem = request_limits(wanted, record)
        if problem is None:
            return Choice(url=record.url, record=record, started=True)
        note = f"Note: the server at {record.url} for this model cannot honour {problem}: running in-process."
    elif keep_alive_s is not None:
        note = "Note: --keep-alive starts a server with the default KV-cache options: running in-process."
    return Choice(note=note)


def _given(url: str, wanted: Wanted, api_key: str | None) -> Choice:
    """An explicit --server URL: checked against its state file when it is a local server of ours; a server
    this machine knows nothing about is trusted with the model, but not with options it cannot be asked for."""
    from phi3v_ort.client.transport import base_url

    url = base_url(url)
    record = next((r for r in registry.recorded() if r.url == url), None)
    if record is not None:
        problem = mismatch(wanted, record, api_key)
    else:
        asked = [("--device " + wanted.device, wanted.device != "auto"),
                 (f"--threads {wanted.threads}", wanted.threads is not None),
                 (f"--processor {wanted.processor}", wanted.processor != "own"),
                 ("--no-share-buffer", not wanted.share_buffer), ("--cuda-graph", wanted.cuda_graph)]
        problem = next((f"{option} (a server's options are fixed when it starts)" for option, given in asked
                        if given), None)
    if problem is not None:
        raise Phi3vError(f"the server at {url} cannot honour {problem}: drop the option, or use --no-server")
    return Choice(url=url, record=record)


def resolved(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())
