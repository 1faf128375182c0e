"""Model worker processes, seen from the caller: the model generates in its own process, so a long prefill never
freezes the caller.

onnxruntime-genai 0.18 holds the Python GIL for the whole of every call, and `Generator.set_inputs()` runs the
entire prefill (measured on `small`: /health answered after 23.9 s; a Python thread beside it stalled 23 s). And a
native crash in og kills its process. vLLM's answer is the layout used here: the caller (the HTTP server, the
batch runner) parses, prepares images, tokenizes and streams; a worker process (process.py) owns one loaded model
and its kept conversations, and they talk over a narrow boundary of typed messages (protocol.py), a
`multiprocessing` pipe with the `spawn` start method.

A worker runs one job at a time. A worker that dies (native crash, OOM kill, kill -9) is seen as the end of its
pipe: its in-flight request gets an error, and the pool starts a new worker, backing off when deaths repeat.
`start_workers` is the one way the CLI's batch and serve get workers and this process's input pipeline: the
package is read once, here.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from phi3v_ort.errors import Phi3vError
from phi3v_ort.workers.process import worker_main
from phi3v_ort.workers.protocol import (Cancel, Close, End, Error, ErrorKind, Event, Failed, Job, JobSummary, Reply,
                                        WorkerSpec)

if TYPE_CHECKING:
    from phi3v_ort.inputs.pipeline import InputBuilder
    from phi3v_ort.package.loading import PackageInfo

__all__ = ["Job", "Worker", "WorkerPool", "WorkerSpec", "StartedWorkers", "run_job", "start_workers"]

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # wait before the n-th restart in a row
STABLE_S = 60.0  # a worker alive this long resets the backoff


Callback = Callable[[Reply], None]  # gets this request's Event*, then an Error if it failed, then its End


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
        process = context.Process(target=worker_main, args=(self.spec, child), daemon=True,
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
        if isinstance(message, Failed):
            process.join(5)
            raise Phi3vError(message.message)
        self.process, self.conn = process, parent
        self.info = {"pid": message.pid, "device": message.device, "threads": message.threads}
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
            self._send(job)
        except (OSError, ValueError):  # the pipe broke: the reader thread reports the death
            pass

    def cancel(self, request_id: str) -> None:
        try:
            self._send(Cancel(request_id))
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
            with self._state:
                current = self.current
            if current is None or message.request_id != current[0]:
                continue  # a late message of a request already ended
            if isinstance(message, End):
                with self._state:
                    self.current = None
            current[1](message)
            if isinstance(message, End) and self.on_idle:
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
            current[1](Error(current[0], ErrorKind.WORKER_DIED, message))
            current[1](End(current[0], JobSummary()))
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
                self._send(Close())
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
    return replace(spec, gpu=index % gpus)


def run_job(worker: Worker, job: Job,
            on_event: Callable[[object], None] | None = None) -> tuple[list, Error | None, JobSummary]:
    """Send `job` and wait for its end, in this thread: (events, error or None, summary). The batch runner's
    way to use a worker; the server consumes the callbacks asynchronously instead."""
    events: list = []
    error: Error | None = None
    summary = JobSummary()
    done = threading.Event()

    def callback(reply: Reply) -> None:
        nonlocal error, summary
        if isinstance(reply, Event):
            events.append(reply.event)
            if on_event:
                on_event(reply.event)
        elif isinstance(reply, Error):
            error = reply
        elif isinstance(reply, End):
            summary = reply.summary
            done.set()

    worker.submit(job, callback)
    done.wait()
    return events, error, summary


@dataclass
class StartedWorkers:
    """Started workers and this process's side of the same package, read once."""

    pool: WorkerPool
    info: "PackageInfo"
    builder: "InputBuilder"  # the package's tokenizer and vision input shape (inputs.pipeline)
    pipeline: object  # this process's input pipeline for the chosen processor and crop budget


def start_workers(model: str | None, model_dir: str | None, device: str, workers: int, threads: int | None,
                  processor: str = "own", crops: int | None = None,
                  worker_memory_limit: str | None = None) -> StartedWorkers:
    """The model in `workers` worker processes (the CPU threads divided among them, each under a memory limit:
    memory_limit.py), and this process's input pipeline for the same package (a bad crop budget is refused before
    any worker starts)."""
    from phi3v_ort.engine.kv_cache import KVCachePolicy
    from phi3v_ort.inputs.pipeline import make_pipeline
    from phi3v_ort.package.device import gpu_count, resolve_device
    from phi3v_ort.package.fetch import resolve_model_dir
    from phi3v_ort.package.loading import default_threads, open_inputs, read_package

    from phi3v_ort.workers import memory_limit

    limit = memory_limit.parse_size(worker_memory_limit) if worker_memory_limit is not None else None
    info = read_package(resolve_model_dir(model, model_dir, device))
    builder = open_inputs(info)
    pipeline = make_pipeline(builder, processor, crops)
    resolved = resolve_device(device)
    threads = threads or (default_threads(workers) if resolved == "cpu" else None)
    if worker_memory_limit is None:
        limit = memory_limit.default_limit(resolved)
    spec = WorkerSpec(str(info.path), resolved, KVCachePolicy(), threads, memory_limit=limit)
    pool = WorkerPool(spec, workers, gpus=gpu_count() if resolved == "cuda" else 0).start()
    return StartedWorkers(pool, info, builder, pipeline)
