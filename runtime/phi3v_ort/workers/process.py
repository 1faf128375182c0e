"""The model worker process: loads one model, then answers one Job at a time (protocol.py) until Close or until
its pipe ends.

It checks for a Cancel between tokens (a cancel during the prefill is honoured as soon as og returns). The
conversations it answered are kept (KV reuse across requests) under the id of the request that produced them, at
most `keep_conversations` of them and `keep_kv_bytes` of KV cache, the oldest dropped first; the parent routes a
follow-up to the worker that holds it.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict

from phi3v_ort.errors import Phi3vError
from phi3v_ort.workers import memory_limit
from phi3v_ort.workers.protocol import (Cancel, Close, End, Error, Event, Failed, Job, JobSummary, Ready,
                                        WorkerSpec)


def worker_main(spec: WorkerSpec, conn) -> None:
    """The spawned process's entry point."""
    import signal

    # Ctrl-C in a terminal reaches the whole process group: the parent decides what stops (it cancels jobs)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        runner = load(spec, conn)
        if runner is not None:
            runner.serve()
    except (EOFError, OSError, BrokenPipeError):  # the parent is gone: nothing left to answer
        pass


def load(spec: WorkerSpec, conn) -> "JobRunner | None":
    """Load the model and say Ready (or Failed, in one sentence)."""
    if spec.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(spec.gpu)
    memory_limit.apply(spec.memory_limit)  # a runaway allocation ends this worker's request, not the machine
    try:
        from phi3v_ort.engine.model import load_model

        model = load_model(spec.model_dir, spec.device, spec.policy, spec.threads)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which turns it into one sentence
        conn.send(Failed(str(exc) if isinstance(exc, Phi3vError) else f"{type(exc).__name__}: {exc}"))
        return None
    conn.send(Ready(pid=os.getpid(), device=model.device, threads=model.threads))
    return JobRunner(model, spec, conn)


class JobRunner:
    """A loaded model answering jobs from `conn`, with the conversations it keeps."""

    def __init__(self, model, spec: WorkerSpec, conn):
        self.model, self.spec, self.conn = model, spec, conn
        self.kept: OrderedDict[str, object] = OrderedDict()  # request id -> Conversation
        self.pending: list = []  # messages read while answering (a job or close sent early)

    def serve(self) -> None:
        while True:
            message = self.pending.pop(0) if self.pending else self.conn.recv()
            if isinstance(message, Close):
                return
            if isinstance(message, Job):
                self.run(message)

    def run(self, job: Job) -> None:
        """Answer one job: its events, an Error if it failed, then End with what was done."""
        from phi3v_ort.engine.generation import Finished, TokenEvent

        rid = job.request_id
        generated, prompt_tokens, kv_reused, kept, cancelled = 0, 0, False, False, False
        try:
            conv = self.conversation(job)
            if self.spec.prefill_delay_s:
                time.sleep(self.spec.prefill_delay_s)
            events = conv.ask(job.question, job.images, job.tokens)
            try:
                for event in events:
                    if isinstance(event, TokenEvent):
                        generated += 1
                    elif isinstance(event, Finished):
                        prompt_tokens, kv_reused = event.stats.prompt_tokens, event.stats.kv_reused
                    self.conn.send(Event(rid, event))
                    if self.cancelled(rid):
                        cancelled = True
                        break
            finally:
                events.close()
            if not cancelled and job.keep:
                kept = self.keep(rid, conv)
        except Exception as exc:  # noqa: BLE001 - this request fails (a 4xx or 500); the worker lives on
            self.conn.send(Error.of(rid, exc))
        self.conn.send(End(rid, JobSummary(prompt_tokens, generated, kv_reused, kept, cancelled)))

    def conversation(self, job: Job):
        """The kept conversation this job continues, or a fresh one with the job's history."""
        from phi3v_ort.engine.conversation import Conversation
        from phi3v_ort.engine.kv_cache import job_reserve
        from phi3v_ort.inputs.prompt import Turn

        conv = self.kept.pop(job.resume, None) if job.resume else None
        if conv is not None and not same_prompt_inputs(conv, job):
            conv = None  # its cache holds the prompt's tokens as another crop budget, processor or system made them
        if conv is None:
            conv = Conversation(self.model, job.settings, job.system,
                                reserve_tokens=job_reserve(job.settings.max_new_tokens), processor=job.processor,
                                crops=job.crops, drop_old_turns=job.drop_old_turns)
            conv.turns = [Turn(t.question, list(t.images), t.answer) for t in job.history]
        conv.settings = job.settings
        return conv

    def cancelled(self, request_id: str) -> bool:
        """Whether a Cancel for this request arrived; other messages wait in `pending`."""
        found = False
        while self.conn.poll():
            message = self.conn.recv()
            if isinstance(message, Cancel):
                found = found or message.request_id == request_id
            else:
                self.pending.append(message)
        return found

    def keep(self, request_id: str, conv) -> bool:
        """Keep a conversation for a follow-up, dropping the oldest beyond the count and KV-byte limits."""
        self.kept[request_id] = conv
        while self.kept and (len(self.kept) > self.spec.keep_conversations
                             or self.kept_bytes() > self.spec.keep_kv_bytes):
            self.kept.popitem(last=False)
        return request_id in self.kept

    def kept_bytes(self) -> int:
        return sum(c.last_stats.kv_cache_bytes for c in self.kept.values() if getattr(c, "last_stats", None))


def same_prompt_inputs(conv, job: Job) -> bool:
    """Whether a kept conversation's tokens were made as this job's would be: the same system message, processor
    and crop budget (the parent's routing key says so too: server/service.py transcript_key)."""
    from phi3v_ort.package.contract import MAX_CROPS

    crops = MAX_CROPS if job.crops is None else job.crops
    return conv.system == job.system and conv.pipeline.name == job.processor and conv.pipeline.crops == crops
