"""What the server's routes share (vLLM's engine client, on the standard library): the workers, the package's input
pipeline (read once), the queue in front of the workers, the routing of conversations, auth, and the shutdown.
Image fetching and preparation run in bounded thread pools (Pillow and numpy release the GIL); the transcript is
tokenized here, once, and its ids travel with the job.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sys
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from phi3v_ort.engine import kv_cache
from phi3v_ort.engine.kv_cache import answer_budget
from phi3v_ort.errors import Phi3vError
from phi3v_ort.inputs.images import load_image
from phi3v_ort.inputs.pipeline import InputBuilder
from phi3v_ort.inputs.prompt import Turn
from phi3v_ort.inputs.tokens import TranscriptIds
from phi3v_ort.package.loading import PackageInfo
from phi3v_ort.server.openai_request import ApiError, ImageRef, ParsedRequest, parse_json_body
from phi3v_ort.workers.pool import WorkerPool
from phi3v_ort.workers.protocol import End, Error, ErrorKind, Reply


@dataclass(frozen=True)
class ServerLimits:
    max_queue: int = 16
    max_body_bytes: int = 32 * 2**20
    max_images: int = 8
    max_image_bytes: int = 16 * 2**20
    max_tokens_default: int = 512
    max_tokens_limit: int = 4096  # the most max_tokens a request may ask for (serve --max-tokens-limit)
    image_timeout_s: float = 10.0  # one deadline per remote image, redirects and every read included
    prepare_threads: int = 2  # decoding + preparation at once, across all requests
    fetch_threads: int = 4  # remote fetches at once
    grace_s: float = 10.0  # on SIGTERM: how long running answers may finish
    keep_routes: int = 256  # conversations remembered for routing a follow-up to its worker


@dataclass(frozen=True)
class Counted:
    """A request's transcript as the server counted it: what the worker prefills and what usage reports."""

    turns: list[Turn]  # the history, images prepared
    tokens: TranscriptIds
    image_tokens: list[int]  # per image, the whole conversation's
    budget: int  # the answer's max_new_tokens, cut to what the context leaves

    @property
    def prompt_tokens(self) -> int:
        return len(self.tokens.ids)


def transcript_key(system: str | None, turns: list[tuple[str, list[bytes], str]],
                   inputs: tuple[str, int] = ("own", 16)) -> str:
    """Identifies a conversation by what the client sent: system, and per turn question, image bytes, answer; and
    by `inputs` (the processor, the crop budget): they change the prompt's tokens, so a follow-up that changes them
    must not continue the cache built from the old ones."""
    h = hashlib.sha256(json.dumps([system, *inputs]).encode())
    for question, images, answer in turns:
        h.update(json.dumps([question, answer]).encode())
        for data in images:
            h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


class Service:
    """What the routes share: the workers, the input pipeline, the queue, the routing of conversations."""

    def __init__(self, pool: WorkerPool, info: PackageInfo, limits: ServerLimits, allow_remote: bool,
                 processor: str, builder: InputBuilder | None = None, api_key: str | None = None):
        from phi3v_ort.package.loading import open_inputs

        self.pool, self.info, self.limits = pool, info, limits
        self.allow_remote, self.processor, self.api_key = allow_remote, processor, api_key
        self.builder = builder if builder is not None else open_inputs(info)
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

    def ensure_loop(self) -> None:
        self.loop = asyncio.get_running_loop()

    # -- the request -----------------------------------------------------------------------------------------------

    def check_auth(self, headers) -> None:
        if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            raise ApiError(401, "invalid or missing API key", "authentication_error")

    async def read_body(self, request) -> dict:
        """The JSON body, refused (413) beyond max_body_bytes, whether or not it says its length."""
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body larger than {limit // 2**20} MB")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body larger than {limit // 2**20} MB")
        return parse_json_body(bytes(body))

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
        try:
            image = load_image("-", stdin=io.BytesIO(raw), max_bytes=self.limits.max_image_bytes)
            return pipeline.prepare_image(image)
        except Phi3vError as exc:
            raise ApiError(400, str(exc).replace("image stdin", "an image").replace("stdin", "an image"),
                           param="messages") from None

    # -- context ---------------------------------------------------------------------------------------------------

    def check_context(self, req: ParsedRequest, history, images, explicit_max: bool, pipeline) -> Counted:
        """Tokenizes the whole transcript here, once (no worker needed; the ids go with the job); refuses what
        cannot fit, as OpenAI does. `history`: (turn, [(raw, prepared)]) pairs; `images`: this turn's pairs.
        Blocking (tokenizing a long text takes seconds, og's processor decodes images to count them): the routes
        call it through `count`, off the event loop."""
        self.check_text_size(req, explicit_max)
        turns = [Turn(t.question, [p for _, p in imgs], t.answer) for t, imgs in history]
        new = Turn(req.question, [p for _, p in images])
        image_tokens = [pipeline.image_tokens(i) for t in turns for i in t.images] + \
            [pipeline.image_tokens(i) for i in new.images]
        try:
            tokens = self.builder.tokenizer.encode_conversation(req.system, turns, new, image_tokens)
        except Phi3vError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        prompt = len(tokens.ids)
        context = self.info.context_length
        wanted = req.settings.max_new_tokens
        if prompt + (wanted if explicit_max else 1) > context:
            requested = prompt + wanted
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{requested} tokens ({prompt} in the messages, {wanted} in the completion). Please "
                                "reduce the length of the messages or completion.", param="messages",
                           code="context_length_exceeded")
        budget = answer_budget(context, prompt, wanted)
        self.check_kv_memory(prompt, budget)
        return Counted(turns, tokens, image_tokens, budget)

    def check_max_tokens(self, req: ParsedRequest, body: dict, cap: bool) -> None:
        """max_tokens beyond the server's limit: a 400 naming it, never a silently shorter answer (`cap`, the
        phi3v extension's cap_max_tokens, only lets a prompt that leaves less room get what fits; a warm `run`
        reads the limit from the state file and answers in-process when it asks for more)."""
        limit = self.limits.max_tokens_limit
        wanted = req.settings.max_new_tokens
        if wanted <= limit:
            return
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        raise ApiError(400, f"{name} must be at most {limit} on this server (serve --max-tokens-limit), got {wanted}",
                       param=name)

    def check_kv_memory(self, prompt: int, budget: int) -> None:
        """Refuse an answer whose KV buffer (prompt + answer + the kept conversation's reserve, allocated up front)
        the machine cannot hold; only on the CPU (og 0.18 does not report free GPU memory)."""
        if self.pool.workers[0].spec.device != "cpu":
            return
        max_length = min(prompt + budget + kv_cache.job_reserve(budget), self.info.context_length)
        refusal = kv_cache.memory_refusal(kv_cache.kv_cache_bytes(self.info, max_length), kv_cache.available_memory(),
                                          max_length)
        if refusal is not None:
            raise ApiError(400, refusal, param="max_tokens")

    async def count(self, req: ParsedRequest, history, images, explicit_max: bool, pipeline) -> Counted:
        """check_context in a thread: the event loop keeps answering (/health, other streams) meanwhile."""
        return await asyncio.to_thread(self.check_context, req, history, images, explicit_max, pipeline)

    def check_text_size(self, req: ParsedRequest, explicit_max: bool) -> None:
        """Refuse text that cannot fit before tokenizing it: its characters give a lower bound on its tokens
        (PromptTokenizer.min_tokens), so this never refuses a request that would fit."""
        chars = len(req.system or "") + len(req.question) + sum(len(t.question) + len(t.answer or "")
                                                                for t in req.history)
        least = self.builder.tokenizer.min_tokens(chars)
        context = self.info.context_length
        wanted = req.settings.max_new_tokens
        if least + (wanted if explicit_max else 1) > context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, the messages "
                                f"are {chars:,} characters, at least {least:,} tokens. Please reduce the length of "
                                "the messages.", param="messages", code="context_length_exceeded")

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
            active.push(Error(active.request_id, ErrorKind.SHUTDOWN, "the server is shutting down"))
            active.push(End(active.request_id))
            active.worker.cancel(active.request_id)


async def _done(value):
    return value


class Active:
    """One request running on a worker: its replies, as an asyncio queue fed from the worker's reader thread."""

    def __init__(self, service: Service, worker, request_id: str):
        self.service, self.worker, self.request_id = service, worker, request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.ended = False

    def callback(self, reply: Reply) -> None:  # worker reader thread
        self.loop.call_soon_threadsafe(self.push, reply)

    def push(self, reply: Reply) -> None:
        if not self.ended:
            if isinstance(reply, End):
                self.ended = True
            self.queue.put_nowait(reply)
