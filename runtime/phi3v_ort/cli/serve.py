"""`phi3v-ort serve`: the OpenAI-compatible server (phi3v_ort.server) over worker processes."""

from __future__ import annotations

import click

from phi3v_ort.cli.group import cli
from phi3v_ort.cli.options import model_options, start_workers, threads_option, worker_memory_option
from phi3v_ort.errors import missing_extra


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
@worker_memory_option
@click.option("--processor", type=click.Choice(["own", "og"]), default="own", show_default=True,
              help="own: the runtime's input pipeline (the reference processor's behaviour); og: onnxruntime-genai's.")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests waiting for a worker; beyond: 429.")
@click.option("--max-tokens-limit", type=click.IntRange(min=1), default=4096, show_default=True,
              help="The most max_tokens a request may ask for (beyond: 400): each answer's KV cache is allocated "
              "up front for its max_tokens.")
@click.option("--allow-remote-images", is_flag=True, help="Accept http(s) image URLs (never to private addresses).")
@click.option("--model-name", default=None,
              help="The model id clients see [default: the catalog or local package's name, else the folder's]; "
              "requests may also name the model by its catalog aliases.")
@click.option("--allowed-hosts", "allowed_hosts_", multiple=True, metavar="NAMES",
              help="Host names the server answers besides loopback ones and IP addresses (comma-separated or "
              "repeated; '*': any): it refuses others (403) against DNS rebinding.")
@click.option("--no-metrics", is_flag=True, help="No /metrics (Prometheus text format; open, as /health is).")
@click.option("-q", "--quiet", is_flag=True, help="No access log (one line per request on stderr).")
@click.option("--idle-exit", default=None, metavar="DURATION",
              help="Exit after DURATION without requests (30s, 5m, 1h): what `run --keep-alive` starts.")
def serve(model: str | None, model_dir: str | None, device: str, host: str, port: int, api_key: str | None,
          workers: int, threads: int | None, worker_memory_limit: str | None, processor: str, max_queue: int,
          max_tokens_limit: int, allow_remote_images: bool, model_name: str | None, allowed_hosts_: tuple[str, ...],
          no_metrics: bool, quiet: bool, idle_exit: str | None) -> None:
    """An OpenAI-compatible server with a web page; the models run in worker processes.

    Serves a page to try the model in a browser at http://HOST:PORT/, /v1/chat/completions (streaming too),
    /v1/models, /health and /metrics (Prometheus). Logs one line per request on stderr (method, path, status,
    prompt and completion tokens, time to first token, total time) unless --quiet. While it serves, `run` and
    `chat` for the same model use it (`--server auto`), and `phi3v-ort ps` lists it.

    \b
    Examples:
      phi3v-ort serve                                  # then open http://127.0.0.1:8000/
      phi3v-ort serve --model-dir tests/fixtures/tiny-int4-cpu --port 8001
      phi3v-ort serve --host 0.0.0.0 --api-key s3cret --workers 2
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'
    """
    import time

    from phi3v_ort.server.idle import parse_duration

    try:
        from phi3v_ort.server.app import ServerLimits, bind_socket, create_app, serve_forever
    except ImportError as exc:
        raise missing_extra("serving", "serve", exc.name) from None
    idle_exit_s = parse_duration(idle_exit, "--idle-exit") if idle_exit is not None else None
    sock = bind_socket(host, port)  # a port in use is one sentence now, before any model loads
    try:
        loading = time.perf_counter()
        started = start_workers(model, model_dir, device, workers, threads, processor,
                                worker_memory_limit=worker_memory_limit)
        load_s = time.perf_counter() - loading
    except BaseException:
        sock.close()
        raise
    spec = started.pool.workers[0].spec
    from phi3v_ort.package.fetch import model_names

    names = model_names(model, model_dir, device)  # the catalog name and its variant's label, or the local name
    name = model_name or names[0]
    limits = ServerLimits(max_queue=max_queue, max_tokens_limit=max_tokens_limit)
    from phi3v_ort.server.guard import allowed_hosts

    hosts = allowed_hosts(host, [h for given in allowed_hosts_ for h in given.split(",")])
    app = create_app(started, name, api_key, limits, allow_remote_images, processor=processor, access_log=not quiet,
                     hosts=hosts, aliases=names, metrics=not no_metrics)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving {name} ({spec.device}, {workers} worker(s)"
               f"{f', {spec.threads} thread(s) each' if spec.threads else ''}) on http://{shown}:{port}/v1 "
               f"(web page: http://{shown}:{port}/)", err=True)
    from phi3v_ort.server.presence import announced, server_record

    record = server_record(sock, host, spec, name, processor, workers, bool(api_key), limits, load_s, idle_exit_s)
    with announced(app, sock, record):  # findable by run/chat/ps/stop while it serves (registry.py)
        serve_forever(app, host, port, limits.grace_s, sock=sock)
