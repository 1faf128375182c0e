"""`phi3v-ort serve`: an OpenAI-compatible chat-completions server (Starlette + uvicorn) over model worker processes.

Process layout (vLLM's, on the standard library; workers/): this process parses requests (openai_request.py),
fetches and prepares images (the runtime's input pipeline, in a small thread pool: Pillow and numpy release the
GIL), tokenizes each prompt once, queues, answers 429s, checks auth and streams; `--workers N` worker processes
each own a model and generate. og holds the GIL for a whole prefill, so in one process /health would wait for it
(23.9 s measured on `small`); here the event loop never runs og code.

Layout (vLLM's router / serving / engine client): this module is the routes, each a thin function;
completions.py is one chat completion (admit -> submit -> collect or stream); service.py what the routes share
(workers, input pipeline, queue, conversation routing); access_log.py the access log.

- POST /v1/chat/completions (string or content-part messages, `image_url` as data: URIs, and as http(s) URLs only
  with --allow-remote-images, checked on every redirect hop and never to private addresses: remote.py), streaming
  as SSE chunks ending with `data: [DONE]`; GET /v1/models (the model's id and aliases: a request naming another
  model is a 404 model_not_found, served_models.py); GET /health (workers alive/busy/restarts).
- Load: one generation per worker; at most `max_queue` requests wait for a worker, beyond that 429 with
  Retry-After. Image counts and sizes are checked before anything is decoded; decoding and preparation run in a
  bounded pool, remote fetches in their own so they cannot starve the rest.
- Context: a conversation that does not fit is a 400 with code `context_length_exceeded` (no silent dropping).
- Faults: a bad request is a 4xx with OpenAI's error body; a client that disconnects (streaming or not) cancels its
  generation; a worker that dies fails only its request (a 500, or an error event in the stream) and is restarted;
  on SIGTERM queued requests get a 503 at once and running ones finish within the grace period or end with an
  error event.
- Structured output: `response_format` json_object / json_schema (guidance.py) constrains decoding; a schema og
  cannot compile is a 400 naming response_format, also for a streamed request (its response starts only once the
  worker has created its generator), and an answer cut by max_tokens ends with finish_reason "length".
- Reuse: a request whose messages extend a conversation answered recently is sent to the worker that keeps its
  generator (conversation.py) and continues it instead of re-prefilling.
- Web pages: only the Host names it was told (loopback by default) and only JSON POSTs to the API (guard.py), so
  a page on another site can neither rebind a name to it nor post a form to it.
- GET / is a single self-contained page to try the model in a browser (web.py: inline HTML, CSS and JS, no
  network beyond this server); responses to chat requests carry `X-Phi3v-Image-Tokens` (per image, the whole
  conversation's) for it.
- Metrics: GET /metrics in Prometheus's text format (metrics.py: requests by route and status, time to first token
  and end-to-end histograms, tokens, queue, busy and restarted workers), open as /health is; `metrics=False`
  (serve --no-metrics) removes it.
- Access log: one line per request on stderr (client, method, path, status, prompt and completion tokens, time to
  first token, total time), written when the response has ended; `create_app(access_log=False)` (serve --quiet)
  turns it off.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from phi3v_ort.errors import ContextTooLong, Phi3vError
from phi3v_ort.package.loading import read_package
from phi3v_ort.server.access_log import AccessLog
from phi3v_ort.server.completions import Completion, error_response
from phi3v_ort.server.guard import RequestGuard, allowed_hosts
from phi3v_ort.server.metrics import MetricsMiddleware, ServerMetrics
from phi3v_ort.server.openai_request import ApiError
from phi3v_ort.server.served_models import model_list, served_names
from phi3v_ort.server.service import Service, ServerLimits
from phi3v_ort.workers.pool import StartedWorkers, WorkerPool, WorkerSpec


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: a port in use (or an address this machine does not have) is one sentence
    before anything starts, and uvicorn gets this very socket (no window for another process to take the port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise Phi3vError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: no wait after a restart
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise Phi3vError(f"port {port} on {host} is already in use: stop what is listening there, or choose "
                             "another --port") from None
        raise Phi3vError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def create_app(pool: WorkerPool | WorkerSpec | StartedWorkers, model_name: str = "phi-3-vision",
               api_key: str | None = None, limits: ServerLimits = ServerLimits(), allow_remote_images: bool = False,
               workers: int = 1, processor: str = "own", access_log: bool = True, log_stream=None,
               hosts: frozenset[str] | None = None, aliases: Sequence[str] = (), metrics: bool = True) -> Starlette:
    """The app over started workers (workers.start_workers: the package already read), a started WorkerPool, or a
    WorkerSpec (`workers` of them are started here); `access_log`: one line per request on `log_stream` (default
    stderr); `hosts`: the Host names it answers (guard.allowed_hosts; default: loopback ones); `aliases`: other
    names a request's `model` may give (package.fetch.model_names), besides `model_name`, the id it answers with;
    `metrics`: GET /metrics (metrics.py; serve --no-metrics: none)."""
    info = builder = None
    if isinstance(pool, StartedWorkers):
        pool, info, builder = pool.pool, pool.info, pool.builder
    elif isinstance(pool, WorkerSpec):
        pool = WorkerPool(pool, workers).start()
    info = info or read_package(pool.workers[0].spec.model_dir)
    service = Service(pool, info, limits, allow_remote_images, processor, builder, api_key)
    api = routes(service, served_names(model_name, aliases))
    middleware = [Middleware(AccessLog, stream=log_stream)] if access_log else []
    figures = None
    if metrics:
        figures = ServerMetrics(service, {route.path for route in api} | {"/metrics"})
        api.append(Route("/metrics", figures.endpoint, methods=["GET"]))
        middleware.append(Middleware(MetricsMiddleware, metrics=figures))  # outside the guard: refusals count
    middleware.append(Middleware(RequestGuard, allowed=hosts if hosts is not None else allowed_hosts()))
    app = Starlette(routes=api,
                    exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error},
                    middleware=middleware)
    app.state.service = service
    app.state.metrics = figures
    app.state.model_names = served_names(model_name, aliases)
    app.state.pool = pool
    return app


def routes(service: Service, names: tuple[str, ...]) -> list[Route]:
    """The routes, each a thin function over the service; `names`: the model's id, then its aliases."""
    model_name = names[0]

    async def chat_completions(request: Request) -> Response:
        service.ensure_loop()
        return await Completion(service, request, model_name).respond()

    async def list_models(request: Request) -> Response:
        try:
            service.check_auth(request.headers)
        except ApiError as exc:
            return error_response(exc)
        return JSONResponse(model_list(names, service.processor))

    async def health(request: Request) -> Response:
        service.ensure_loop()
        report = service.health()
        report["model"] = model_name
        return JSONResponse(report, status_code=200 if report["alive"] else 503)

    async def web_page(request: Request) -> Response:
        from phi3v_ort.server.web import CONTENT_SECURITY_POLICY, page

        return HTMLResponse(page(model_name), headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                                        "Cache-Control": "no-cache"})

    return [Route("/", web_page, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/health", health, methods=["GET"])]


async def not_found(request: Request, exc) -> Response:
    return error_response(ApiError(404, f"no route {request.url.path}"))


async def method_not_allowed(request: Request, exc) -> Response:
    return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))


async def server_error(request: Request, exc) -> Response:
    return error_response(ApiError(500, "internal error", "server_error"))


def serve_forever(app: Starlette, host: str, port: int, grace_s: float, sock: socket.socket | None = None) -> None:
    """uvicorn, with SIGTERM/SIGINT first telling the service (503 for the queue, deadline for running answers).
    `sock`: an already bound socket (bind_socket) to serve on instead of binding HOST:PORT here."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.service.begin_shutdown()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(grace_s))
    try:
        Server(config).run(sockets=[sock] if sock is not None else None)
    finally:
        app.state.pool.close()


__all__ = ["ServerLimits", "bind_socket", "create_app", "serve_forever", "ContextTooLong"]
