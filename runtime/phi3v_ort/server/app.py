"""`phi3v-ort serve`: an OpenAI-compatible chat-completions server (Starlette + uvicorn) over model worker processes.

Process layout (vLLM's, on the standard library; worker.py): this process parses requests (openai_request.py),
fetches and prepares images (the runtime's input pipeline, in a small thread pool: Pillow and numpy release the
GIL), counts tokens, queues, answers 429s, checks auth and streams; `--workers N` worker processes each own a
model and generate. og holds the GIL for a whole prefill, so in one process /health would wait for it (23.9 s
measured on `small`); here the event loop never runs og code.

- POST /v1/chat/completions (string or content-part messages, `image_url` as data: URIs, and as http(s) URLs only
  with --allow-remote-images, checked on every redirect hop and never to private addresses: remote.py), streaming
  as SSE chunks ending with `data: [DONE]`; GET /v1/models; GET /health (workers alive/busy/restarts).
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
- GET / is a single self-contained page to try the model in a browser (web.py: inline HTML, CSS and JS, no
  network beyond this server); responses to chat requests carry `X-Phi3v-Image-Tokens` (per image, the whole
  conversation's) for it.
- Access log: one line per request on stderr (client, method, path, status, prompt and completion tokens, time to
  first token, total time), written when the response has ended; `create_app(access_log=False)` (serve --quiet)
  turns it off.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import socket
import sys
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from phi3v_ort.engine.conversation import ContextTooLong, transcript
from phi3v_ort.errors import Phi3vError
from phi3v_ort.engine.generation import Finished, Notice, TokenEvent
from phi3v_ort.inputs.images import load_image
from phi3v_ort.inputs.pipeline import make_pipeline
from phi3v_ort.package.loading import PackageInfo, open_inputs, read_package
from phi3v_ort.server.extension import response_fields
from phi3v_ort.server.openai_request import ApiError, ImageRef, ParsedRequest, StopStringFilter, parse_json_body, parse_request
from phi3v_ort.workers.pool import HistoryTurn, Job, WorkerPool, WorkerSpec


@dataclass(frozen=True)
class ServerLimits:
    max_queue: int = 16
    max_body_bytes: int = 32 * 2**20
    max_images: int = 8
    max_image_bytes: int = 16 * 2**20
    max_tokens_default: int = 512
    image_timeout_s: float = 10.0  # one deadline per remote image, redirects and every read included
    prepare_threads: int = 2  # decoding + preparation at once, across all requests
    fetch_threads: int = 4  # remote fetches at once
    grace_s: float = 10.0  # on SIGTERM: how long running answers may finish
    keep_routes: int = 256  # conversations remembered for routing a follow-up to its worker


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def transcript_key(system: str | None, turns: list[tuple[str, list[bytes], str]]) -> str:
    """Identifies a conversation by what the client sent: system, and per turn question, image bytes, answer."""
    h = hashlib.sha256(json.dumps(system).encode())
    for question, images, answer in turns:
        h.update(json.dumps([question, answer]).encode())
        for data in images:
            h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


class Service:
    """What the routes share: the workers, the input pipeline, the queue, the routing of conversations."""

    def __init__(self, pool: WorkerPool, info: PackageInfo, limits: ServerLimits, allow_remote: bool,
                 processor: str):
        self.pool, self.info, self.limits = pool, info, limits
        self.allow_remote, self.processor = allow_remote, processor
        self.builder = open_inputs(info)
        self.prepare_pool = ThreadPoolExecutor(limits.prepare_threads, thread_name_prefix="prepare")
        self.fetch_pool = ThreadPoolExecutor(limits.fetch_threads, thread_name_prefix="fetch")
        self.routes: OrderedDict[str, tuple[int, str]] = OrderedDict()  # key -> (worker index, request id)
        self.waiting = 0
        self.shutting_down = False
        self.active: dict[str, "Active"] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # the serving loop (for the shutdown timer)
        self.waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        pool.listeners.append(self._wake_waiters)

    def _wake_waiters(self) -> None:  # from a worker's reader thread (or the loop, on shutdown)
        for loop, event in list(self.waiters):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed: its waiter is gone
                self.waiters.discard((loop, event))

    # -- images ----------------------------------------------------------------------------------------------------

    async def prepare_images(self, refs: list[ImageRef], pipeline) -> list[tuple[bytes, object]]:
        """(raw bytes, prepared image) per ref: fetched (own pool), decoded and prepared (bounded pool)."""
        loop = asyncio.get_running_loop()
        raws = await asyncio.gather(*[
            loop.run_in_executor(self.fetch_pool, self._fetch, ref) if ref.url else _done(ref.data)
            for ref in refs])
        prepared = await asyncio.gather(*[loop.run_in_executor(self.prepare_pool, self._prepare, raw, pipeline)
                                          for raw in raws])
        return list(zip(raws, prepared))

    def _fetch(self, ref: ImageRef) -> bytes:
        from phi3v_ort.inputs.remote import fetch_image_bytes

        try:
            return fetch_image_bytes(ref.url, max_bytes=self.limits.max_image_bytes,
                                     deadline_s=self.limits.image_timeout_s)
        except Phi3vError as exc:  # one neutral sentence; the cause stays in the server's log
            detail = getattr(exc, "detail", "")
            if detail:
                print(f"remote image {ref.url}: {detail}", file=sys.stderr)
            raise ApiError(400, str(exc), param=f"messages[{ref.index}].content") from None

    def _prepare(self, raw: bytes, pipeline):
        import io

        try:
            image = load_image("-", stdin=io.BytesIO(raw), max_bytes=self.limits.max_image_bytes)
            return pipeline.prepare_image(image)
        except Phi3vError as exc:
            raise ApiError(400, str(exc).replace("image stdin", "an image").replace("stdin", "an image"),
                           param="messages") from None

    # -- context ---------------------------------------------------------------------------------------------------

    def check_context(self, req: ParsedRequest, history, images, explicit_max: bool) -> tuple[int, int]:
        """Counts the whole transcript's tokens here (no worker needed); refuses what cannot fit, as OpenAI does,
        and returns (the answer budget, the prompt tokens: what usage reports, kept cache or not)."""
        from phi3v_ort.engine.conversation import Turn

        pipeline = make_pipeline(self.builder, self.processor, req.crops)
        turns = [Turn(t.question, [p for _, p in imgs], t.answer) for t, imgs in history]
        new = Turn(req.question, [p for _, p in images])
        try:
            segments = transcript(req.system, turns, new)
        except Phi3vError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        all_images = [i for t in turns for i in t.images] + new.images
        prompt = len(self.builder.tokenizer.encode(segments, [pipeline.image_tokens(i) for i in all_images]))
        context = self.info.context_length
        wanted = req.settings.max_new_tokens
        if prompt + (wanted if explicit_max else 1) > context:
            requested = prompt + wanted
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{requested} tokens ({prompt} in the messages, {wanted} in the completion). Please "
                                "reduce the length of the messages or completion.", param="messages",
                           code="context_length_exceeded")
        return min(wanted, context - prompt), prompt

    # -- workers ---------------------------------------------------------------------------------------------------

    async def acquire(self, prefer: int | None):
        """An idle worker (the preferred one if idle), waiting in the queue if none is; 429 beyond the queue."""
        worker = self.pool.idle_worker(prefer)
        if worker is None and self.waiting >= self.limits.max_queue:
            raise ApiError(429, "the server is busy: too many requests waiting", "rate_limit_error",
                           headers={"Retry-After": "1"})
        self.waiting += 1
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        self.waiters.add(waiter)
        try:
            while worker is None:
                if self.shutting_down:
                    raise ApiError(503, "the server is shutting down", "server_error")
                waiter[1].clear()
                try:
                    await asyncio.wait_for(waiter[1].wait(), 0.5)
                except asyncio.TimeoutError:
                    pass
                worker = self.pool.idle_worker(prefer)
        finally:
            self.waiting -= 1
            self.waiters.discard(waiter)
        if self.shutting_down:
            raise ApiError(503, "the server is shutting down", "server_error")
        return worker

    def remember(self, key: str, worker_index: int, request_id: str) -> None:
        self.routes[key] = (worker_index, request_id)
        self.routes.move_to_end(key)
        while len(self.routes) > self.limits.keep_routes:
            self.routes.popitem(last=False)

    def health(self) -> dict:
        workers = self.pool.health()
        alive = sum(w["alive"] for w in workers)
        return {"status": "ok" if alive == len(workers) else ("degraded" if alive else "down"),
                "workers": workers, "alive": alive, "busy": sum(w["busy"] for w in workers),
                "running": len(self.active), "waiting": self.waiting, "shutting_down": self.shutting_down}

    def begin_shutdown(self) -> None:
        """SIGTERM: queued requests get a 503 now; running ones get `grace_s` to finish, then an error event."""
        if self.shutting_down:
            return
        self.shutting_down = True
        self._wake_waiters()
        if self.loop is not None:
            self.loop.call_later(max(0.5, self.limits.grace_s - 1.0), self._end_running)

    def _end_running(self) -> None:
        for active in list(self.active.values()):
            active.push(("error", "shutdown", "the server is shutting down", {}))
            active.push(("end", {}))
            active.worker.cancel(active.request_id)


async def _done(value):
    return value


class Active:
    """One request running on a worker: its events, as an asyncio queue fed from the worker's reader thread."""

    def __init__(self, service: Service, worker, request_id: str):
        self.service, self.worker, self.request_id = service, worker, request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.ended = False

    def callback(self, item: tuple) -> None:  # worker reader thread
        self.loop.call_soon_threadsafe(self.push, item)

    def push(self, item: tuple) -> None:
        if not self.ended:
            if item[0] == "end":
                self.ended = True
            self.queue.put_nowait(item)


LOG_KEY = "phi3v.log"  # the scope entry where a route leaves what the access log reports (tokens, first token)


class AccessLog:
    """ASGI middleware: one line per HTTP request on `stream`, once its response has ended (a stream included):
    `CLIENT "METHOD PATH" STATUS prompt_tokens=P completion_tokens=C ttft_ms=T total_ms=D` (`-` where a request
    has no such figure). The chat route fills scope[LOG_KEY]; a client gone before any response logs 499."""

    def __init__(self, app, stream=None):
        self.app, self.stream = app, stream

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        record = scope[LOG_KEY] = {"started": started}
        status: list[int] = []

        async def send_logged(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        except Exception:
            if not status:
                status.append(500)  # Starlette's ServerErrorMiddleware, outside this one, answers it
            raise
        finally:
            self.write(scope, status[0] if status else 499, record, time.perf_counter() - started)

    def write(self, scope, status: int, record: dict, total_s: float) -> None:
        client = scope.get("client")
        path = scope.get("path", "")
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")

        def figure(key: str) -> str:
            value = record.get(key)
            return "-" if value is None else str(value)

        first = record.get("first_token")
        ttft = "-" if first is None else f"{(first - record['started']) * 1000:.0f}"
        line = (f"{client[0] if client else '-'} \"{scope.get('method', '-')} {path}\" {status} "
                f"prompt_tokens={figure('prompt_tokens')} completion_tokens={figure('completion_tokens')} "
                f"ttft_ms={ttft} total_ms={total_s * 1000:.0f}")
        try:
            print(line, file=self.stream or sys.stderr, flush=True)
        except (OSError, ValueError):  # a closed or broken stderr never fails a request
            pass


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


def create_app(pool: WorkerPool | WorkerSpec, model_name: str = "phi-3-vision", api_key: str | None = None,
               limits: ServerLimits = ServerLimits(), allow_remote_images: bool = False, workers: int = 1,
               processor: str = "own", access_log: bool = True, log_stream=None) -> Starlette:
    """The app over a started WorkerPool (or a WorkerSpec: `workers` of them are started here); `access_log`: one
    line per request on `log_stream` (default stderr)."""
    if isinstance(pool, WorkerSpec):
        pool = WorkerPool(pool, workers).start()
    info = read_package(pool.workers[0].spec.model_dir)
    service = Service(pool, info, limits, allow_remote_images, processor)

    def check_auth(request: Request) -> None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(401, "invalid or missing API key", "authentication_error")

    async def read_body(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_body_bytes:
            raise ApiError(413, f"request body larger than {limits.max_body_bytes // 2**20} MB")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ApiError(413, f"request body larger than {limits.max_body_bytes // 2**20} MB")
        return parse_json_body(bytes(body))

    def ensure_loop() -> None:
        service.loop = asyncio.get_running_loop()

    async def chat_completions(request: Request) -> Response:
        ensure_loop()
        record = request.scope.get(LOG_KEY, {})  # what the access log reports (AccessLog)
        try:
            check_auth(request)
            if service.shutting_down:
                raise ApiError(503, "the server is shutting down", "server_error")
            body = await read_body(request)
            req = parse_request(body, allow_remote=allow_remote_images, max_images=limits.max_images,
                                max_image_bytes=limits.max_image_bytes, max_tokens_default=limits.max_tokens_default)
            try:
                pipeline = make_pipeline(service.builder, processor, req.crops)
            except Phi3vError as exc:
                raise ApiError(400, str(exc), param="crops") from None
            history = [(t, await service.prepare_images(t.images, pipeline)) for t in req.history]
            images = await service.prepare_images(req.images, pipeline)
            explicit = body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None
            explicit = explicit and not (req.phi3v and req.phi3v.cap_max_tokens)
            budget, prompt_tokens = service.check_context(req, history, images, explicit)
            record["prompt_tokens"] = prompt_tokens
            image_tokens = [pipeline.image_tokens(p) for _, imgs in history for _, p in imgs] \
                + [pipeline.image_tokens(p) for _, p in images]
            key_before = transcript_key(req.system, [(t.question, [r for r, _ in imgs], t.answer)
                                                     for t, imgs in history])
            route = service.routes.get(key_before)
            worker = await service.acquire(route[0] if route else None)
        except ApiError as exc:
            return _error_response(exc)
        from dataclasses import replace

        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        job = Job(request_id=request_id, question=req.question, images=[p for _, p in images],
                  settings=replace(req.settings, max_new_tokens=budget), system=req.system,
                  history=[HistoryTurn(t.question, [p for _, p in imgs], t.answer) for t, imgs in history],
                  processor=processor, crops=req.crops,
                  resume=route[1] if route and route[0] == worker.index else None)
        active = Active(service, worker, request_id)
        service.active[request_id] = active
        try:
            worker.submit(job, active.callback)
        except RuntimeError:
            service.active.pop(request_id, None)
            return _error_response(ApiError(503, "the model worker is restarting; try again", "server_error",
                                            headers={"Retry-After": "1"}))
        created = int(time.time())
        image_header = {"X-Phi3v-Image-Tokens": ",".join(map(str, image_tokens))}
        stops = StopStringFilter(req.stop)
        # usage.prompt_tokens is the whole conversation, as OpenAI counts it (also when the worker only appended
        # the new turn to a kept cache, and when a stop string cancelled the answer before its stats came)
        state = {"text": "", "generated": 0, "prompt_tokens": prompt_tokens, "finish": None, "error": None,
                 "kv_reused": False}

        def on_end() -> None:
            service.active.pop(request_id, None)
            record["completion_tokens"] = state["generated"]
            if state["error"] is None and state["finish"] in ("stop", "length") and not stops.stopped:
                key_after = transcript_key(req.system, [(t.question, [r for r, _ in imgs], t.answer)
                                                        for t, imgs in history]
                                           + [(req.question, [r for r, _ in images], state["text"])])
                service.remember(key_after, worker.index, request_id)

        def handle(item) -> str | None:
            """Update the state with one worker item; returns text to send, if any."""
            kind = item[0]
            if kind == "event":
                event = item[1]
                if isinstance(event, TokenEvent):
                    if stops.stopped:
                        return None  # the worker ran on until the cancel reached it: not part of the answer
                    state["generated"] += 1
                    if state["generated"] == 1:
                        record["first_token"] = time.perf_counter()
                    delta = stops.feed(event.text)
                    state["text"] += delta
                    if stops.stopped:
                        state["finish"] = "stop"
                        worker.cancel(request_id)
                    return delta
                if isinstance(event, Finished):
                    state["kv_reused"] = event.stats.kv_reused
                    state["finished"] = event
                    if not stops.stopped:
                        state["finish"] = event.stats.finish_reason
                        tail = stops.flush()
                        state["text"] += tail
                        return tail
            elif kind == "error":
                state["error"] = item[1:]
            return None

        def error_api(error) -> ApiError:
            kind, message, details = error
            if kind == "context":
                return ApiError(400, message, param="messages", code="context_length_exceeded")
            if kind == "invalid":
                return ApiError(400, message)
            if kind == "guidance":
                return ApiError(400, message, param="response_format")
            if kind == "shutdown":
                return ApiError(503, message, "server_error")
            return ApiError(500, message, "server_error")

        def usage() -> dict:
            p, c = state["prompt_tokens"], state["generated"]
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        disconnect_checked = [time.monotonic()]

        async def next_item(poll_disconnect: bool):
            # every 0.25 s, also while tokens keep coming (a decoding worker never leaves the queue empty that long)
            while True:
                if poll_disconnect and time.monotonic() - disconnect_checked[0] >= 0.25:
                    disconnect_checked[0] = time.monotonic()
                    if await request.is_disconnected():
                        return None
                try:
                    return await asyncio.wait_for(active.queue.get(), 0.25 if poll_disconnect else None)
                except asyncio.TimeoutError:
                    pass

        if not req.stream:
            try:
                while True:
                    item = await next_item(poll_disconnect=True)
                    if item is None:  # the client went away: stop the generation, free the worker
                        worker.cancel(request_id)
                        return Response(status_code=499)
                    handle(item)
                    if item[0] == "end":
                        break
            finally:
                if not active.ended:
                    worker.cancel(request_id)
                on_end()
            if state["error"]:
                return _error_response(error_api(state["error"]))
            return JSONResponse({
                "id": request_id, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": state["text"]},
                             "finish_reason": state["finish"] or "length", "logprobs": None}],
                "usage": usage(),
                **response_fields(req.phi3v, state.get("finished"), getattr(request.app.state, "load_s", None)),
            }, headers={"X-Phi3v-KV-Reused": "true" if state["kv_reused"] else "false", **image_header})

        first: list = []  # a streamed constrained answer: the worker's first item, already read (see below)
        if req.settings.guidance is not None:
            # og compiles the constraint when the worker creates its generator, before the prefill: wait for the
            # worker's first item, so a schema og cannot compile is a 400 here, not an error inside a 200 stream
            while not first or (first[-1][0] == "event" and isinstance(first[-1][1], Notice)):
                item = await next_item(poll_disconnect=True)
                if item is None:  # the client went away
                    worker.cancel(request_id)
                    on_end()
                    return Response(status_code=499)
                if item[0] == "error":
                    handle(item)
                    while item[0] != "end":
                        item = await next_item(poll_disconnect=False)
                    on_end()
                    return _error_response(error_api(state["error"]))
                first.append(item)

        def chunk(delta: dict, finish: str | None = None, with_usage: dict | None = None,
                  extra: dict | None = None) -> str:
            data = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                    **(extra or {})}
            if with_usage is not None:
                data["choices"], data["usage"] = [], with_usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    item = first.pop(0) if first else await next_item(poll_disconnect=False)
                    text = handle(item)
                    if text:
                        yield chunk({"content": text})
                    if item[0] == "end":
                        break
                if state["error"]:
                    yield f"data: {json.dumps(error_api(state['error']).body())}\n\n"
                else:
                    yield chunk({}, state["finish"] or "length",
                                extra=response_fields(req.phi3v, state.get("finished"),
                                                      getattr(request.app.state, "load_s", None)))
                    if req.include_usage:
                        yield chunk({}, with_usage=usage())
                yield "data: [DONE]\n\n"
            finally:
                if not active.ended:  # the client went away mid-stream: stop the generation, free the worker
                    worker.cancel(request_id)
                on_end()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **image_header})

    async def list_models(request: Request) -> Response:
        try:
            check_auth(request)
        except ApiError as exc:
            return _error_response(exc)
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                                         "owned_by": "phi3v-ort", "max_crops": 16,
                                                         "default_crops": 16, "processor": processor}]})

    async def health(request: Request) -> Response:
        ensure_loop()
        report = service.health()
        report["model"] = model_name
        return JSONResponse(report, status_code=200 if report["alive"] else 503)

    async def web_page(request: Request) -> Response:
        from phi3v_ort.server.web import CONTENT_SECURITY_POLICY, page

        return HTMLResponse(page(model_name), headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                                                        "Cache-Control": "no-cache"})

    async def not_found(request: Request, exc) -> Response:
        return _error_response(ApiError(404, f"no route {request.url.path}"))

    async def method_not_allowed(request: Request, exc) -> Response:
        return _error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    async def server_error(request: Request, exc) -> Response:
        return _error_response(ApiError(500, "internal error", "server_error"))

    from starlette.middleware import Middleware

    app = Starlette(routes=[Route("/", web_page, methods=["GET"]),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                            Route("/v1/models", list_models, methods=["GET"]),
                            Route("/health", health, methods=["GET"])],
                    exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error},
                    middleware=[Middleware(AccessLog, stream=log_stream)] if access_log else [])
    app.state.service = service
    app.state.pool = pool
    return app


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
