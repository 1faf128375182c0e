"""Model worker processes: the model generates in its own process, so a long prefill never freezes the caller.

onnxruntime-genai 0.18 holds the Python GIL for the whole of every call, and `Generator.set_inputs()` runs the
entire prefill (measured on `small`: /health answered after 23.9 s; a Python thread beside it stalled 23 s). And a
native crash in og kills its process. vLLM's answer is the layout used here: the caller (the HTTP server, the
batch runner) parses, prepares images and streams; a worker process owns one loaded model and its kept
conversations, and they talk over a narrow boundary, a `multiprocessing` pipe with the `spawn` start method:

    parent -> worker   ("job", Job) | ("cancel", request_id) | ("close",)
    worker -> parent   ("ready", info) | ("event", request_id, TokenEvent | Notice | Finished)
                       | ("error", request_id, kind, message, details) | ("end", request_id, summary)

Error kinds: "context" (does not fit), "guidance" (an output constraint og cannot compile: before any prefill),
"invalid" (another bad request), "internal" (anything else, og's constrained decoder failing mid-answer too).

A worker runs one job at a time; it checks for a cancel between tokens (a cancel during the prefill is honoured as
soon as og returns). Conversations it answered are kept in the worker (KV reuse across requests), under the id of
the request that produced them; the parent routes a follow-up to the worker that holds it. A worker that dies
(native crash, OOM kill, kill -9) is seen as the end of its pipe: its in-flight request gets an error, and the pool
starts a new worker, backing off when deaths repeat.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from phi3v_ort.errors import Phi3vError
from phi3v_ort.engine.kv_cache import KVCachePolicy
from phi3v_ort.engine.settings import GenerationSettings
from phi3v_ort.workers import memory_limit

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # wait before the n-th restart in a row
STABLE_S = 60.0  # a worker alive this long resets the backoff


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker loads (picklable: it crosses to the spawned process)."""

    model_dir: str
    device: str = "cpu"
    policy: KVCachePolicy = KVCachePolicy()
    threads: int | None = None
    gpu: int | None = None  # CUDA_VISIBLE_DEVICES for this worker (worker i on GPU i)
    keep_conversations: int = 4
    keep_kv_bytes: int = 2 * 2**30
    memory_limit: int | None = None  # bytes of address space for the worker (memory_limit.py); None: none
    prefill_delay_s: float = 0.0  # tests only: each prefill takes this much longer (observe a long prefill)


@dataclass
class HistoryTurn:
    question: str
    images: list  # prepared images (PreparedImage / OgImage)
    answer: str


@dataclass
class Job:
    """One request for a worker: a turn, with the history it follows when it is a chat."""

    request_id: str
    question: str
    images: list  # prepared images of this turn
    settings: GenerationSettings
    system: str | None = None
    history: list[HistoryTurn] = field(default_factory=list)
    processor: str = "own"
    crops: int | None = None
    resume: str | None = None  # the request id whose kept conversation this turn continues (if still kept)
    keep: bool = True  # keep the conversation for a follow-up
    drop_old_turns: bool = False


# -- the worker process --------------------------------------------------------------------------------------------

def _worker_main(spec: WorkerSpec, conn) -> None:
    import signal

    # Ctrl-C in a terminal reaches the whole process group: the parent decides what stops (it cancels jobs)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _serve_jobs(spec, conn)
    except (EOFError, OSError, BrokenPipeError):  # the parent is gone: nothing left to answer
        pass


def _serve_jobs(spec: WorkerSpec, conn) -> None:
    if spec.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(spec.gpu)
    memory_limit.apply(spec.memory_limit)  # a runaway allocation ends this worker's request, not the machine
    try:
        from phi3v_ort.engine.model import load_model

        model = load_model(spec.model_dir, spec.device, spec.policy, spec.threads)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which turns it into one sentence
        conn.send(("failed", str(exc) if isinstance(exc, Phi3vError) else f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", {"pid": os.getpid(), "device": model.device, "threads": model.threads}))
    kept: OrderedDict[str, object] = OrderedDict()
    pending: list = []
    while True:
        message = pending.pop(0) if pending else conn.recv()
        if message[0] == "close":
            return
        if message[0] == "job":
            _run_job(model, spec, message[1], conn, kept, pending)


def _run_job(model, spec: WorkerSpec, job: Job, conn, kept: OrderedDict, pending: list) -> None:
    from phi3v_ort.engine.conversation import ContextTooLong, Conversation, Turn
    from phi3v_ort.engine.generation import Finished, TokenEvent
    from phi3v_ort.engine.guidance import GuidanceError, GuidanceFailed

    rid = job.request_id
    cancelled = False

    def poll_cancel() -> bool:
        nonlocal cancelled
        while conn.poll():
            message = conn.recv()
            if message[0] == "cancel" and message[1] == rid:
                cancelled = True
            elif message[0] != "cancel":  # a job or close sent early: after this one
                pending.append(message)
        return cancelled

    # prompt_tokens / kv_reused come with the Finished event (a cancelled answer has none: the server counts the
    # prompt itself, in its own process)
    summary = {"prompt_tokens": 0, "generated": 0, "kv_reused": False, "kept": False, "cancelled": False}
    try:
        conv = kept.pop(job.resume, None) if job.resume else None
        if conv is None:
            conv = Conversation(model, job.settings, job.system,
                                reserve_tokens=min(job.settings.max_new_tokens + 256, 4096),
                                processor=job.processor, crops=job.crops, drop_old_turns=job.drop_old_turns)
            conv.turns = [Turn(t.question, list(t.images), t.answer) for t in job.history]
        conv.settings = job.settings
        if spec.prefill_delay_s:
            time.sleep(spec.prefill_delay_s)
        events = conv.ask(job.question, job.images)
        try:
            for event in events:
                if isinstance(event, TokenEvent):
                    summary["generated"] += 1
                elif isinstance(event, Finished):
                    summary["prompt_tokens"] = event.stats.prompt_tokens
                    summary["kv_reused"] = event.stats.kv_reused
                conn.send(("event", rid, event))
                if poll_cancel():
                    break
        finally:
            events.close()
        summary["cancelled"] = cancelled
        if not cancelled and job.keep:
            kept[rid] = conv
            while kept and (len(kept) > spec.keep_conversations or _kept_bytes(kept) > spec.keep_kv_bytes):
                kept.popitem(last=False)
            summary["kept"] = rid in kept
    except ContextTooLong as exc:
        conn.send(("error", rid, "context", str(exc), {"requested": exc.requested, "allowed": exc.allowed}))
    except GuidanceError as exc:  # og could not compile the output constraint (before any prefill): the client's
        conn.send(("error", rid, "guidance", str(exc), {}))
    except GuidanceFailed as exc:  # og's constrained decoder failed mid-answer: not the client's fault
        conn.send(("error", rid, "internal", str(exc), {}))
    except Phi3vError as exc:
        conn.send(("error", rid, "invalid", str(exc), {}))
    except Exception as exc:  # noqa: BLE001 - this request fails with a 500; the worker lives on
        conn.send(("error", rid, "internal", f"{type(exc).__name__}: {str(exc).strip()[:500]}",
                   {"traceback": traceback.format_exc(limit=5)}))
    conn.send(("end", rid, summary))


def _kept_bytes(kept: OrderedDict) -> int:
    return sum(c.last_stats.kv_cache_bytes for c in kept.values() if getattr(c, "last_stats", None))


# -- the parent's side ---------------------------------------------------------------------------------------------

Callback = Callable[[tuple], None]  # gets ("event", ev) | ("error", kind, message, details) | ("end", summary)


class Worker:
    """One worker process seen from the parent: start, send a job, cancel, notice its death, restart."""

    def __init__(self, index: int, spec: WorkerSpec, on_idle: Callable[[], None] | None = None):
        self.index, self.spec, self.on_idle = index, spec, on_idle
        self.process = None
        self.conn = None
        self.current: tuple[str, Callback] | None = None
        self.alive = False
        self.restarts = 0
        self.deaths_in_a_row = 0
        self.last_exit: str | None = None
        self.info: dict = {}
        self.started_at = 0.0
        self.closing = False
        self.claimed = False  # handed to a caller by WorkerPool.acquire, not yet given a job
        self._send_lock = threading.Lock()
        self._state = threading.Condition()

    @property
    def busy(self) -> bool:
        return self.current is not None or self.claimed

    def start(self, timeout: float = 600.0) -> None:
        """Start the process and wait until its model is loaded (a load failure is one Phi3vError)."""
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(target=_worker_main, args=(self.spec, child), daemon=True,
                                  name=f"phi3v-ort-worker-{self.index}")
        process.start()
        child.close()
        if not parent.poll(timeout):
            process.kill()
            raise Phi3vError(f"model worker {self.index} did not load the model within {timeout:.0f} s")
        try:
            message = parent.recv()
        except (EOFError, OSError):
            process.join(5)
            raise Phi3vError(f"model worker {self.index} died while loading the model "
                             f"(exit code {process.exitcode})") from None
        if message[0] == "failed":
            process.join(5)
            raise Phi3vError(message[1])
        self.process, self.conn, self.info = process, parent, message[1]
        self.alive, self.started_at = True, time.monotonic()
        threading.Thread(target=self._read, args=(process, parent), daemon=True,
                         name=f"phi3v-ort-worker-{self.index}-reader").start()

    def submit(self, job: Job, callback: Callback) -> None:
        with self._state:
            if not self.alive or self.current is not None:
                self.claimed = False
                raise RuntimeError(f"worker {self.index} is not idle")
            self.current = (job.request_id, callback)
            self.claimed = False
        try:
            self._send(("job", job))
        except (OSError, ValueError):  # the pipe broke: the reader thread reports the death
            pass

    def cancel(self, request_id: str) -> None:
        try:
            self._send(("cancel", request_id))
        except (OSError, ValueError):
            pass

    def _send(self, message) -> None:
        with self._send_lock:
            self.conn.send(message)

    def _read(self, process, conn) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            with self._state:
                current = self.current
            if current is None or message[1] != current[0]:
                continue  # a late message of a request already ended
            callback = current[1]
            if kind == "event":
                callback(("event", message[2]))
            elif kind == "error":
                callback(("error", *message[2:]))
            elif kind == "end":
                with self._state:
                    self.current = None
                callback(("end", message[2]))
                if self.on_idle:
                    self.on_idle()
        self._died(process)

    def _died(self, process) -> None:
        process.join(5)
        code = process.exitcode
        with self._state:
            current, self.current = self.current, None
            self.alive = False
            self.last_exit = f"exit code {code}" if code is None or code >= 0 else f"killed by signal {-code}"
        if current is not None:
            message = f"the model worker stopped while answering ({self.last_exit}); it is being restarted"
            current[1](("error", "worker_died", message, {}))
            current[1](("end", {"prompt_tokens": 0, "generated": 0, "kv_reused": False, "kept": False,
                                "cancelled": False}))
        if self.closing:
            return
        if time.monotonic() - self.started_at > STABLE_S:
            self.deaths_in_a_row = 0
        wait = RESTART_BACKOFF_S[min(self.deaths_in_a_row, len(RESTART_BACKOFF_S) - 1)]
        self.deaths_in_a_row += 1
        threading.Thread(target=self._restart, args=(wait,), daemon=True).start()

    def _restart(self, wait: float) -> None:
        while not self.closing:
            time.sleep(wait)
            if self.closing:
                return
            try:
                self.start()
                self.restarts += 1
                if self.on_idle:
                    self.on_idle()
                return
            except Phi3vError as exc:
                self.last_exit = f"restart failed: {exc}"
                wait = min(wait * 2, RESTART_BACKOFF_S[-1])

    def close(self, timeout: float = 5.0) -> None:
        self.closing = True
        if self.alive:
            try:
                self._send(("close",))
            except (OSError, ValueError):
                pass
        if self.process is not None:
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)

    def health(self) -> dict:
        return {"index": self.index, "alive": self.alive, "busy": self.busy, "pid": self.info.get("pid"),
                "restarts": self.restarts, "last_exit": self.last_exit,
                "restarting_after_deaths": self.deaths_in_a_row if not self.alive else 0}


class WorkerPool:
    """N workers with one model each; jobs go to an idle worker (the one holding its conversation if idle)."""

    def __init__(self, spec: WorkerSpec, workers: int = 1, gpus: int = 0):
        if workers < 1:
            raise Phi3vError(f"--workers must be at least 1, got {workers}")
        self._idle = threading.Condition()
        self.listeners: list[Callable[[], None]] = []  # told whenever a worker becomes idle (from its reader thread)
        self.workers = [Worker(i, _with_gpu(spec, i, gpus), on_idle=self._notify) for i in range(workers)]

    def _notify(self) -> None:
        with self._idle:
            self._idle.notify_all()
        for listener in self.listeners:
            listener()

    def start(self) -> "WorkerPool":
        """Start every worker, in parallel (each loads its model)."""
        errors: list[Exception] = []

        def start(worker: Worker) -> None:
            try:
                worker.start()
            except Exception as exc:  # noqa: BLE001 - the first failure is raised below
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(w,)) for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.close()
            raise errors[0]
        return self

    def idle_worker(self, prefer: int | None = None) -> Worker | None:
        idle = [w for w in self.workers if w.alive and not w.busy]
        preferred = [w for w in idle if w.index == prefer]
        return (preferred or idle or [None])[0]

    def acquire(self, prefer: int | None = None, timeout: float | None = None) -> Worker | None:
        """Block until a worker is idle (or `timeout`): for the batch runner's threads."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while True:
                worker = self.idle_worker(prefer)
                if worker is not None:
                    worker.claimed = True
                    return worker
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._idle.wait(0.5 if left is None else min(left, 0.5))

    def health(self) -> list[dict]:
        return [w.health() for w in self.workers]

    def close(self, timeout: float = 5.0) -> None:
        for w in self.workers:
            w.closing = True
        for w in self.workers:
            w.close(timeout)


def _with_gpu(spec: WorkerSpec, index: int, gpus: int) -> WorkerSpec:
    """Worker i on GPU i when there are enough GPUs (CUDA_VISIBLE_DEVICES), else as given."""
    if spec.device == "cpu" or gpus < 2:
        return spec
    from dataclasses import replace

    return replace(spec, gpu=index % gpus)


def run_job(worker: Worker, job: Job, on_event: Callable[[object], None] | None = None) -> tuple[list, dict | None,
                                                                                                   dict]:
    """Send `job` and wait for its end, in this thread: (events, error or None, summary). The batch runner's
    way to use a worker; the server consumes the callbacks asynchronously instead."""
    events: list = []
    error: dict | None = None
    summary: dict = {}
    done = threading.Event()

    def callback(item: tuple) -> None:
        nonlocal error, summary
        if item[0] == "event":
            events.append(item[1])
            if on_event:
                on_event(item[1])
        elif item[0] == "error":
            error = {"kind": item[1], "message": item[2], **item[3]}
        elif item[0] == "end":
            summary = item[1]
            done.set()

    worker.submit(job, callback)
    done.wait()
    return events, error, summary
