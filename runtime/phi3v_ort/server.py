"""`phi3v-ort serve`: an OpenAI-compatible chat-completions server (Starlette + uvicorn).

- POST /v1/chat/completions (string or content-part messages, `image_url` as data: URIs, and as http(s) URLs only
  with --allow-remote-images and never to loopback/private/link-local/metadata addresses), streaming as SSE chunks
  ending with `data: [DONE]`; GET /v1/models; GET /health.
- Load: at most `max_concurrency` generations run at once, at most `max_queue` wait; beyond that 429 with
  Retry-After. Each request's KV cache is sized to it (prompt + max_tokens + room for one follow-up turn).
- Faults: every bad request is a 4xx with OpenAI's error body; a client that disconnects mid-stream stops its
  generation and frees its generator.
- Reuse: a request whose messages extend a conversation answered recently continues its kept generator
  (conversation.py) instead of re-prefilling; a few such conversations are kept (LRU, bounded by count and by
  KV-cache bytes).

Every request is served by a Conversation, so the server, the chat and the tests share one generation path.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import json
import socket
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlparse

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .conversation import Conversation, Turn
from .errors import Phi3vError
from .generation import Finished, TokenEvent
from .images import ImageInput, load_image
from .loading import LoadedModel
from .settings import GenerationSettings


@dataclass(frozen=True)
class ServerLimits:
    max_concurrency: int = 1
    max_queue: int = 16
    max_body_bytes: int = 32 * 2**20
    max_images: int = 8
    max_image_bytes: int = 16 * 2**20
    max_tokens_default: int = 512
    keep_conversations: int = 4
    keep_kv_bytes: int = 2 * 2**30
    image_timeout_s: float = 10.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": None}}, status_code=self.status, headers=self.headers)


# -- request parsing -------------------------------------------------------------------------------------------------

@dataclass
class ParsedRequest:
    system: str | None
    history: list[Turn]  # earlier user turns with the assistant's answers
    question: str
    images: list[ImageInput]
    settings: GenerationSettings
    stream: bool
    include_usage: bool
    stop: list[str]


def _blocked_address(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return True
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
                or ip.is_unspecified or str(ip) in ("169.254.169.254", "100.100.100.200", "fd00:ec2::254")):
            return True
    return False


def _image_from_url(url: str, allow_remote: bool, limits: ServerLimits) -> ImageInput:
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ApiError(400, "image data URIs must be base64-encoded", param="image_url")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "an image_url data URI holds invalid base64", param="image_url") from None
        if len(raw) > limits.max_image_bytes:
            raise ApiError(413, f"an image is larger than {limits.max_image_bytes // 2**20} MB", "invalid_request_error")
        import io

        try:
            return load_image("-", stdin=io.BytesIO(raw), max_bytes=limits.max_image_bytes)
        except Phi3vError as exc:
            raise ApiError(400, str(exc).replace("stdin", "the data URI"), param="image_url") from None
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ApiError(400, "image_url must be a data: URI or an http(s) URL", param="image_url")
    if not allow_remote:
        raise ApiError(400, "remote image URLs are disabled on this server (start it with --allow-remote-images), "
                            "send the image as a data: URI", param="image_url")
    if _blocked_address(parsed.hostname):
        raise ApiError(400, f"image host {parsed.hostname} is not allowed (loopback, private, link-local or "
                            "metadata address)", param="image_url")
    try:
        return load_image(url, max_bytes=limits.max_image_bytes, timeout=limits.image_timeout_s)
    except Phi3vError as exc:
        raise ApiError(400, str(exc), param="image_url") from None


def _content(message: dict, index: int, allow_remote: bool, limits: ServerLimits) -> tuple[str, list[ImageInput]]:
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list) or not content:
        raise ApiError(400, f"messages[{index}] has no content", param=f"messages[{index}].content")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ApiError(400, f"messages[{index}] has an image_url part without a url",
                               param=f"messages[{index}].content")
            images.append(_image_from_url(url, allow_remote, limits))
        else:
            raise ApiError(400, f"messages[{index}] has a content part of unsupported type {kind!r}",
                           param=f"messages[{index}].content")
    return "\n".join(texts), images


def parse_request(body: dict, allow_remote: bool, limits: ServerLimits) -> ParsedRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    system_parts: list[str] = []
    turns: list[Turn] = []
    pending: Turn | None = None
    image_count = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] has an unsupported role {role!r}", param=f"messages[{i}].role")
        text, images = _content(message, i, allow_remote, limits)
        image_count += len(images)
        if image_count > limits.max_images:
            raise ApiError(400, f"too many images: at most {limits.max_images} per request", param="messages")
        if role in ("system", "developer"):
            if images or turns or pending:
                raise ApiError(400, f"messages[{i}]: system messages come first and carry text only",
                               param=f"messages[{i}]")
            system_parts.append(text)
        elif role == "user":
            if pending is not None:  # two user messages in a row: one turn
                pending.question += "\n" + text
                pending.images.extend(images)
            else:
                pending = Turn(text, list(images))
        else:
            if pending is None or images:
                raise ApiError(400, f"messages[{i}]: an assistant message must follow a user message and carry "
                                    "text only", param=f"messages[{i}]")
            pending.answer = text
            turns.append(pending)
            pending = None
    if pending is None:
        raise ApiError(400, "the last message must come from the user", param="messages")

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or limits.max_tokens_default
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    seed = body.get("seed")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    try:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError("max_tokens must be a positive integer")
        if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= 4):
            raise ValueError("stop must be a string or a list of at most 4 non-empty strings")
        do_sample = temperature is not None and float(temperature) > 0
        settings = GenerationSettings(
            max_new_tokens=max_tokens, do_sample=do_sample,
            temperature=float(temperature) if do_sample else 1.0,
            top_p=float(top_p) if top_p is not None else 1.0, seed=int(seed) if seed is not None else None)
    except (Phi3vError, ValueError, TypeError) as exc:
        raise ApiError(400, str(exc)) from None
    options = body.get("stream_options") or {}
    return ParsedRequest(system="\n".join(system_parts) or None, history=turns, question=pending.question,
                         images=pending.images, settings=settings, stream=bool(body.get("stream")),
                         include_usage=bool(isinstance(options, dict) and options.get("include_usage")), stop=stop)


# -- kept conversations ------------------------------------------------------------------------------------------

def transcript_key(system: str | None, turns: list[Turn]) -> str:
    h = hashlib.sha256(json.dumps(system).encode())
    for t in turns:
        h.update(json.dumps([t.question, t.answer]).encode())
        for img in t.images:
            h.update(hashlib.sha256(img.data).digest())
    return h.hexdigest()


class ConversationCache:
    """Recently answered conversations with their generators, keyed by transcript; bounded in count and bytes."""

    def __init__(self, max_items: int, max_bytes: int):
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, Conversation] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> Conversation | None:
        with self._lock:
            return self._items.pop(key, None)

    def put(self, key: str, conv: Conversation) -> None:
        with self._lock:
            self._items[key] = conv
            self._items.move_to_end(key)
            while self._items and (len(self._items) > self.max_items or self.bytes() > self.max_bytes):
                self._items.popitem(last=False)

    def bytes(self) -> int:
        return sum(c.last_stats.kv_cache_bytes for c in self._items.values() if c.last_stats)

    def __len__(self) -> int:
        return len(self._items)


# -- the app ---------------------------------------------------------------------------------------------------------

def create_app(model: LoadedModel, model_name: str = "phi-3-vision", api_key: str | None = None,
               limits: ServerLimits = ServerLimits(), allow_remote_images: bool = False) -> Starlette:
    gate = {"running": 0, "waiting": 0}
    slots = asyncio.Semaphore(limits.max_concurrency)
    cache = ConversationCache(limits.keep_conversations, limits.keep_kv_bytes)
    active: set[threading.Event] = set()

    def check_auth(request: Request) -> None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(401, "invalid or missing API key", "authentication_error")

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_body_bytes:
            raise ApiError(413, f"request body larger than {limits.max_body_bytes // 2**20} MB")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ApiError(413, f"request body larger than {limits.max_body_bytes // 2**20} MB")
        try:
            data = json.loads(body)
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return data

    def run_generation(req: ParsedRequest, cancel: threading.Event, emit) -> None:
        """In a worker thread: one turn through a Conversation, events handed to the event loop by `emit`."""
        key = transcript_key(req.system, req.history)
        conv = cache.take(key)
        if conv is None:
            conv = Conversation(model, req.settings, req.system,
                                reserve_tokens=min(req.settings.max_new_tokens + 256, 4096))
            conv.turns = [Turn(t.question, list(t.images), t.answer) for t in req.history]
        conv.settings = req.settings
        text, finish, generated = "", "length", 0
        stats = None
        events = conv.ask(req.question, req.images)
        try:
            for event in events:
                if cancel.is_set():
                    break
                if isinstance(event, TokenEvent):
                    generated += 1
                    text += event.text
                    hit = next((s for s in req.stop if s in text), None)
                    if hit:
                        cut = text.index(hit)
                        emit(("delta", event.text[: max(0, len(event.text) - (len(text) - cut))]))
                        text, finish = text[:cut], "stop"
                        break
                    emit(("delta", event.text))
                elif isinstance(event, Finished):
                    stats = event.stats
                    finish = event.stats.finish_reason
        except Phi3vError as exc:
            emit(("error", str(exc)))
            return
        finally:
            events.close()
        if cancel.is_set():
            return
        if stats is not None:
            prompt_tokens, reused = stats.prompt_tokens, stats.kv_reused
            conv.turns[-1].answer = text
            cache.put(transcript_key(req.system, conv.turns), conv)
        else:  # cut at a stop string: the generator ran past it, so it is not kept for reuse
            prompt_tokens = (len(conv._live.generator.get_sequence(0)) - generated) if conv._live else 0
            reused = False
        emit(("done", {"finish_reason": finish, "prompt_tokens": prompt_tokens, "completion_tokens": generated,
                       "kv_reused": reused}))

    async def acquire() -> None:
        if gate["running"] >= limits.max_concurrency and gate["waiting"] >= limits.max_queue:
            raise ApiError(429, "the server is busy: too many requests waiting", "rate_limit_error",
                           headers={"Retry-After": "1"})
        gate["waiting"] += 1
        try:
            await slots.acquire()
        finally:
            gate["waiting"] -= 1
        gate["running"] += 1

    def release() -> None:
        gate["running"] -= 1
        slots.release()

    async def chat_completions(request: Request) -> Response:
        try:
            check_auth(request)
            body = await read_json(request)
            req = await asyncio.to_thread(parse_request, body, allow_remote_images, limits)
            await acquire()
        except ApiError as exc:
            return exc.response()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        active.add(cancel)

        def emit(item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                run_generation(req, cancel, emit)
            except Exception as exc:  # noqa: BLE001 - reported to the client as a 500, the server stays up
                emit(("crash", f"{type(exc).__name__}: {exc}"))
            finally:
                emit(("end", None))

        threading.Thread(target=work, daemon=True).start()
        created = int(time.time())
        cid = f"chatcmpl-{uuid.uuid4().hex}"

        async def finish_up() -> None:
            cancel.set()
            active.discard(cancel)
            while True:  # wait for the worker to stop before giving its slot back
                kind, _ = await queue.get()
                if kind == "end":
                    break
            release()

        if not req.stream:
            text, done, error = "", None, None
            try:
                while True:
                    kind, payload = await queue.get()
                    if kind == "delta":
                        text += payload
                    elif kind == "done":
                        done = payload
                    elif kind in ("error", "crash"):
                        error = (400 if kind == "error" else 500, payload)
                    elif kind == "end":
                        break
            finally:
                active.discard(cancel)
                release()
            if error:
                return ApiError(error[0], error[1], "invalid_request_error" if error[0] == 400 else "server_error").response()
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": done["finish_reason"], "logprobs": None}],
                "usage": {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                          "total_tokens": done["prompt_tokens"] + done["completion_tokens"]},
            }, headers={"X-Phi3v-KV-Reused": "true" if done["kv_reused"] else "false"})

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            if usage is not None:
                data["choices"], data["usage"] = [], usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events():
            ended = False
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, payload = await queue.get()
                    if kind == "delta":
                        if payload:
                            yield chunk({"content": payload})
                    elif kind == "done":
                        yield chunk({}, payload["finish_reason"])
                        if req.include_usage:
                            yield chunk({}, usage={"prompt_tokens": payload["prompt_tokens"],
                                                   "completion_tokens": payload["completion_tokens"],
                                                   "total_tokens": payload["prompt_tokens"] + payload["completion_tokens"]})
                    elif kind in ("error", "crash"):
                        err = {"message": payload, "type": "invalid_request_error" if kind == "error" else "server_error"}
                        yield f"data: {json.dumps({'error': err})}\n\n"
                    elif kind == "end":
                        ended = True
                        break
                yield "data: [DONE]\n\n"
            finally:
                if ended:
                    active.discard(cancel)
                    release()
                else:  # the client went away mid-stream: stop the generation, free its generator and slot
                    await asyncio.shield(finish_up())

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def list_models(request: Request) -> Response:
        try:
            check_auth(request)
        except ApiError as exc:
            return exc.response()
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                                         "owned_by": "phi3v-ort"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_name, "device": model.device,
                             "running": gate["running"], "waiting": gate["waiting"], "kept_conversations": len(cache)})

    async def not_found(request: Request, exc) -> Response:
        return ApiError(404, f"no route {request.url.path}").response()

    async def method_not_allowed(request: Request, exc) -> Response:
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()

    async def server_error(request: Request, exc) -> Response:
        return ApiError(500, "internal error", "server_error").response()

    app = Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                            Route("/v1/models", list_models, methods=["GET"]),
                            Route("/health", health, methods=["GET"])],
                    exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error})
    app.state.cancel_all = lambda: [event.set() for event in list(active)]
    app.state.cache = cache
    return app
