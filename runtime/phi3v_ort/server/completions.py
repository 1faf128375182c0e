"""One chat completion (vLLM's `serving` layer): admit -> submit -> collect (one JSON body) or stream (SSE).

- admit: auth, body, request fields, images prepared, the transcript tokenized once and checked against the
  context, a worker (the one keeping this conversation when it is idle), or the queue, or a 429;
- submit: the Job, carrying the prepared images and the token ids, to that worker;
- collect / stream: the worker's replies turned into OpenAI's response, stop strings applied, the client's
  disconnect noticed (every 0.25 s) and turned into a cancel; a finished answer is remembered for routing its
  follow-up.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from dataclasses import replace

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from phi3v_ort.engine.generation import Finished, Notice, TokenEvent
from phi3v_ort.engine.stop import StopStringFilter
from phi3v_ort.errors import Phi3vError
from phi3v_ort.inputs.pipeline import make_pipeline
from phi3v_ort.server.access_log import LOG_KEY
from phi3v_ort.server.extension import response_fields
from phi3v_ort.server.openai_request import ApiError, parse_request
from phi3v_ort.server.served_models import check_model
from phi3v_ort.server.service import Active, Counted, Service, transcript_key
from phi3v_ort.workers.protocol import End, Error, Event, Job, Reply


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def api_error(error: Error) -> ApiError:
    """A worker's error as the client sees it (protocol.HTTP_ERRORS). An unexpected exception's text (og's binding
    signatures, a library's internal state) goes to the server's log, never to the client."""
    http = error.http
    message = error.message
    if "traceback" in error.details:
        print(f"request {error.request_id} failed: {message}\n{error.details['traceback']}", file=sys.stderr)
        message = "internal error while answering: the server's log has the details"
    return ApiError(http.status, message, http.type, param=http.param, code=http.code)


class Completion:
    """One POST /v1/chat/completions, from its request to its response."""

    def __init__(self, service: Service, request: Request, model_name: str):
        self.service, self.request, self.model_name = service, request, model_name
        self.record = request.scope.get(LOG_KEY, {})  # what the access log reports (AccessLog)
        self.created = int(time.time())
        self.request_id = f"chatcmpl-{uuid.uuid4().hex}"
        # usage.prompt_tokens is the whole conversation, as OpenAI counts it (also when the worker only appended
        # the new turn to a kept cache, and when a stop string cancelled the answer before its stats came)
        self.text, self.generated, self.finish = "", 0, None
        self.error: Error | None = None
        self.kv_reused = False
        self.finished: Finished | None = None
        self._disconnect_checked = time.monotonic()

    async def respond(self) -> Response:
        try:
            await self.admit()
        except ApiError as exc:
            return error_response(exc)
        refused = self.submit()
        if refused is not None:
            return refused
        if not self.req.stream:
            return await self.collect()
        return await self.stream()

    # -- admit -> submit -------------------------------------------------------------------------------------------

    async def admit(self) -> None:
        """Everything before a worker takes the request; raises ApiError."""
        service = self.service
        service.check_auth(self.request.headers)
        if service.shutting_down:
            raise ApiError(503, "the server is shutting down", "server_error")
        body = await service.read_body(self.request)
        limits = service.limits
        req = self.req = parse_request(body, allow_remote=service.allow_remote, max_images=limits.max_images,
                                       max_image_bytes=limits.max_image_bytes,
                                       max_tokens_default=min(limits.max_tokens_default, limits.max_tokens_limit))
        check_model(body.get("model"), self.request.app.state.model_names)  # 404 model_not_found
        cap = bool(req.phi3v and req.phi3v.cap_max_tokens)
        service.check_max_tokens(req, body, cap)
        try:
            pipeline = self.pipeline = make_pipeline(service.builder, service.processor, req.crops)
        except Phi3vError as exc:
            raise ApiError(400, str(exc), param="crops") from None
        self.history = [(t, await service.prepare_images(t.images, pipeline)) for t in req.history]
        self.images = await service.prepare_images(req.images, pipeline)
        explicit = body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None
        explicit = explicit and not cap
        self.counted: Counted = await service.count(req, self.history, self.images, explicit, pipeline)
        self.prompt_tokens = self.record["prompt_tokens"] = self.counted.prompt_tokens
        self.route = service.routes.get(self.transcript_key())
        self.worker = await service.acquire(self.route[0] if self.route else None)

    def transcript_key(self, answer: str | None = None) -> str:
        """The conversation as the client sent it; with `answer`: as its follow-up will send it."""
        turns = [(t.question, [r for r, _ in imgs], t.answer) for t, imgs in self.history]
        if answer is not None:
            turns.append((self.req.question, [r for r, _ in self.images], answer))
        return transcript_key(self.req.system, turns, (self.pipeline.name, self.pipeline.crops))

    def submit(self) -> Response | None:
        """The job to the worker; a 503 if the worker died in between."""
        req, route, worker = self.req, self.route, self.worker
        job = Job(request_id=self.request_id, question=req.question, images=[p for _, p in self.images],
                  settings=replace(req.settings, max_new_tokens=self.counted.budget), system=req.system,
                  history=self.counted.turns, processor=self.service.processor, crops=req.crops,
                  resume=route[1] if route and route[0] == worker.index else None, tokens=self.counted.tokens)
        self.active = Active(self.service, worker, self.request_id)
        self.service.active[self.request_id] = self.active
        self.stops = StopStringFilter(req.stop)
        try:
            worker.submit(job, self.active.callback)
        except RuntimeError:
            self.service.active.pop(self.request_id, None)
            return error_response(ApiError(503, "the model worker is restarting; try again", "server_error",
                                           headers={"Retry-After": "1"}))
        return None

    # -- the worker's replies --------------------------------------------------------------------------------------

    def handle(self, reply: Reply) -> str | None:
        """Take one reply of the worker; returns text to send, if any."""
        if isinstance(reply, Error):
            self.error = reply
        if not isinstance(reply, Event):
            return None
        event = reply.event
        if isinstance(event, TokenEvent):
            if self.stops.stopped:
                return None  # the worker ran on until the cancel reached it: not part of the answer
            self.generated += 1
            if self.generated == 1:
                self.record["first_token"] = time.perf_counter()
            delta = self.stops.feed(event.text)
            self.text += delta
            if self.stops.stopped:
                self.finish = "stop"
                self.worker.cancel(self.request_id)
            return delta
        if isinstance(event, Finished):
            self.kv_reused = event.stats.kv_reused
            self.finished = event
            if not self.stops.stopped:
                self.finish = event.stats.finish_reason
                tail = self.stops.flush()
                self.text += tail
                return tail
        return None

    async def next_reply(self, poll_disconnect: bool) -> Reply | None:
        """The worker's next reply; None when the client has gone (checked every 0.25 s, also while tokens keep
        coming: a decoding worker never leaves the queue empty that long)."""
        while True:
            if poll_disconnect and time.monotonic() - self._disconnect_checked >= 0.25:
                self._disconnect_checked = time.monotonic()
                if await self.request.is_disconnected():
                    return None
            try:
                return await asyncio.wait_for(self.active.queue.get(), 0.25 if poll_disconnect else None)
            except asyncio.TimeoutError:
                pass

    def on_end(self) -> None:
        self.service.active.pop(self.request_id, None)
        self.record["completion_tokens"] = self.generated
        if self.error is None and self.finish in ("stop", "length") and not self.stops.stopped:
            self.service.remember(self.transcript_key(self.text), self.worker.index, self.request_id)

    def usage(self) -> dict:
        p, c = self.prompt_tokens, self.generated
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def extension_fields(self) -> dict:
        """phi3v-ort's opt-in response fields (extension.py), on the body or the last chunk."""
        return response_fields(self.req.phi3v, self.finished, getattr(self.request.app.state, "load_s", None))

    def image_header(self) -> dict[str, str]:
        return {"X-Phi3v-Image-Tokens": ",".join(map(str, self.counted.image_tokens))}

    # -- collect or stream -----------------------------------------------------------------------------------------

    async def collect(self) -> Response:
        """The whole answer as one chat.completion body."""
        try:
            while True:
                reply = await self.next_reply(poll_disconnect=True)
                if reply is None:  # the client went away: stop the generation, free the worker
                    self.worker.cancel(self.request_id)
                    return Response(status_code=499)
                self.handle(reply)
                if isinstance(reply, End):
                    break
        finally:
            if not self.active.ended:
                self.worker.cancel(self.request_id)
            self.on_end()
        if self.error:
            return error_response(api_error(self.error))
        return JSONResponse({
            "id": self.request_id, "object": "chat.completion", "created": self.created, "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text},
                         "finish_reason": self.finish or "length", "logprobs": None}],
            "usage": self.usage(),
            **self.extension_fields(),
        }, headers={"X-Phi3v-KV-Reused": "true" if self.kv_reused else "false", **self.image_header()})

    async def stream(self) -> Response:
        """SSE chunks. A constrained answer's response starts only once the worker has created its generator (og
        compiles the constraint then, before the prefill): a schema og cannot compile is a 400, not an error
        inside a 200 stream."""
        first: list[Reply] = []  # the worker's first replies, already read
        if self.req.settings.guidance is not None:
            while not first or (isinstance(first[-1], Event) and isinstance(first[-1].event, Notice)):
                reply = await self.next_reply(poll_disconnect=True)
                if reply is None:  # the client went away
                    self.worker.cancel(self.request_id)
                    self.on_end()
                    return Response(status_code=499)
                if isinstance(reply, Error):
                    self.handle(reply)
                    while not isinstance(reply, End):
                        reply = await self.next_reply(poll_disconnect=False)
                    self.on_end()
                    return error_response(api_error(self.error))
                first.append(reply)
        return StreamingResponse(self.events(first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          **self.image_header()})

    def chunk(self, delta: dict, finish: str | None = None, with_usage: dict | None = None,
              extra: dict | None = None) -> str:
        data = {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **(extra or {})}
        if with_usage is not None:
            data["choices"], data["usage"] = [], with_usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self, first: list[Reply]):
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            while True:
                reply = first.pop(0) if first else await self.next_reply(poll_disconnect=False)
                text = self.handle(reply)
                if text:
                    yield self.chunk({"content": text})
                if isinstance(reply, End):
                    break
            if self.error:
                yield f"data: {json.dumps(api_error(self.error).body())}\n\n"
            else:
                yield self.chunk({}, self.finish or "length", extra=self.extension_fields())
                if self.req.include_usage:
                    yield self.chunk({}, with_usage=self.usage())
            yield "data: [DONE]\n\n"
        finally:
            if not self.active.ended:  # the client went away mid-stream: stop the generation, free the worker
                self.worker.cancel(self.request_id)
            self.on_end()
