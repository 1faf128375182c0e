"""`run` and `chat` through a running server: the options that choose one (`--server`, `--no-server`,
`--api-key`, `--keep-alive`), the choice (client/discovery.py) and `run`'s answer printed from the server's
stream exactly as the in-process path prints its own."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from phi3v_ort.errors import Phi3vError

SERVER_ENV = "PHI3V_ORT_SERVER"


@dataclass(frozen=True)
class ServerOptions:
    mode: str  # "auto", "off" or a URL
    api_key: str | None
    keep_alive_s: float | None


def server_options(f: Callable) -> Callable:
    """--server/--no-server/--api-key/--keep-alive, handed to the command as one `server` (ServerOptions)."""
    @functools.wraps(f)
    def command(**kwargs):
        from phi3v_ort.server.idle import parse_duration

        mode, off = kwargs.pop("server_mode"), kwargs.pop("no_server")
        keep_alive = kwargs.pop("keep_alive")
        if off and keep_alive is not None:
            raise Phi3vError("--keep-alive needs a server: drop --no-server")
        mode = "off" if off else (mode or "auto").strip()
        if mode != "auto" and keep_alive is not None:
            raise Phi3vError(f"--keep-alive starts a local server for the model, and the server is {mode}: drop one")
        kwargs["server"] = ServerOptions(mode, kwargs.pop("api_key") or None,
                                         parse_duration(keep_alive, "--keep-alive") if keep_alive else None)
        return f(**kwargs)

    for decorator in reversed([
        click.option("--server", "server_mode", default=None, envvar=SERVER_ENV, metavar="auto|URL",
                     help="auto: answer through a running `phi3v-ort serve` of the same model when there is one "
                     "(its model is already loaded), else in-process; URL: that server; off: never "
                     f"[default: ${SERVER_ENV} or auto]."),
        click.option("--no-server", is_flag=True, help="Always load the model in this process."),
        click.option("--api-key", default=None, envvar="PHI3V_ORT_API_KEY",
                     help="The server's API key (also from $PHI3V_ORT_API_KEY)."),
        click.option("--keep-alive", default=None, metavar="DURATION",
                     help="When no server has this model, start one in the background and keep it until it has "
                     "been idle for DURATION (30s, 5m, 1h); `phi3v-ort ps` lists it, `phi3v-ort stop` ends it."),
    ]):
        command = decorator(command)
    return command


def pick_server(server: ServerOptions, model: str | None, model_dir: str | None, device: str,
                threads: int | None, processor: str, settings, images=(), share_buffer: bool = True,
                cuda_graph: bool = False):
    """The ServerClient that answers, or None for in-process (after the one note that says why, if a server
    was there)."""
    if server.mode == "off":
        return None
    from phi3v_ort.client.discovery import Wanted, choose, resolved

    if server.mode == "auto":
        from phi3v_ort.package.fetch import resolve_model_dir

        folder = resolved(resolve_model_dir(model, model_dir, device))  # as in-process would (it may fetch)
    else:
        folder = resolved(model_dir) if model_dir else None
    wanted = Wanted(folder, device, threads, processor, share_buffer, cuda_graph, settings,
                    tuple(len(img.data) for img in images))
    choice = choose(server.mode, wanted, server.api_key, server.keep_alive_s)
    if choice.started:
        click.echo(f"Note: started a server for {Path(folder).name if folder else 'the model'} at {choice.url}; it exits after "
                   f"{server_duration(server.keep_alive_s)} without requests (`phi3v-ort stop` ends it now).",
                   err=True)
    if choice.note:
        click.echo(choice.note, err=True)
    if choice.url is None:
        return None
    from phi3v_ort.client.answer import ServerClient

    return ServerClient(choice.url, server.api_key)


def server_duration(seconds: float | None) -> str:
    if seconds is None:
        return "a while"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def load_images(sources) -> list:
    """The images as read (ImageInputs). Pillow and numpy are imported only when there are images: a warm text
    question starts sooner."""
    if not sources:
        return []
    from phi3v_ort.inputs.images import load_image

    return [load_image(src) for src in sources]


def answered_by_server(server: ServerOptions, question: str, images, system: str | None, crops: int | None,
                       settings, show_stats: bool, as_json: bool, *, model: str | None, model_dir: str | None,
                       device: str, threads: int | None, processor: str, policy) -> bool:
    """`run` through a server when one answers (printed as in-process); False: answer in-process."""
    client = pick_server(server, model, model_dir, device, threads, processor, settings, images,
                         share_buffer=policy.share_buffer, cuda_graph=policy.cuda_graph)
    return client is not None and answer_through_server(client, server, question, images, system, crops, settings,
                                                        show_stats, as_json)


def answer_through_server(client, server: ServerOptions, question: str, images, system: str | None,
                          crops: int | None, settings, show_stats: bool, as_json: bool) -> bool:
    """`run`'s answer from the server, printed as the in-process path prints it (text streamed, or one JSON
    object; --stats; the constraint's verdict). False when the server could not take the request before any
    answer came and `--server auto` lets the in-process path answer instead (after a note)."""
    from phi3v_ort.cli.output import finish_answer
    from phi3v_ort.engine.events import Finished
    from phi3v_ort.client.answer import ServerUnavailable

    out = sys.stdout
    finished = None
    started = False
    try:
        for event in client.stream(question, images, settings, system, crops):
            started = True
            if isinstance(event, Finished):
                finished = event
            elif not as_json and event.text:
                out.write(event.text)
                out.flush()
    except ServerUnavailable as exc:
        if started or server.mode != "auto":
            raise
        click.echo(f"Note: {exc}: running in-process.", err=True)
        return False
    except KeyboardInterrupt:  # closing the stream closed the connection: the server cancels the generation
        if not as_json:
            out.write("\n")
            out.flush()
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    assert finished is not None
    finish_answer(finished, settings, out, as_json, show_stats)
    return True
