"""The process boundary: the typed messages between a caller (the HTTP server, the batch runner) and a model
worker, over a `multiprocessing` pipe, and what their errors mean to each caller.

    parent -> worker   Job | Cancel | Close
    worker -> parent   Ready | Failed                    (once, when the model is loaded or could not be)
                       Event* then Error? then End       (per request; End always comes last)

A Job carries what the caller already computed: the prepared images (pixels.PreparedImage or OgImage) and, from
the server, the transcript's token ids (tokens.TranscriptIds), so the worker neither re-prepares nor re-tokenizes.
Every error has an ErrorKind; `HTTP_ERRORS` is the one mapping of a kind to an HTTP status and OpenAI error type,
`batch_error` the one mapping to a batch line.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from enum import Enum

from phi3v_ort.engine.generation import Finished, Notice, TokenEvent
from phi3v_ort.engine.guidance import GuidanceError, GuidanceFailed
from phi3v_ort.engine.kv_cache import KVCachePolicy
from phi3v_ort.engine.settings import GenerationSettings
from phi3v_ort.errors import ContextTooLong, Phi3vError
from phi3v_ort.inputs.prompt import Turn
from phi3v_ort.inputs.tokens import TranscriptIds


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


# -- parent -> worker ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One request for a worker: a turn, with the history it follows when it is a chat."""

    request_id: str
    question: str
    images: list  # prepared images of this turn
    settings: GenerationSettings
    system: str | None = None
    history: list[Turn] = field(default_factory=list)  # earlier turns, their images prepared, answers as text
    processor: str = "own"
    crops: int | None = None
    resume: str | None = None  # the request id whose kept conversation this turn continues (if still kept)
    keep: bool = True  # keep the conversation for a follow-up
    drop_old_turns: bool = False
    tokens: TranscriptIds | None = None  # the transcript (history + this turn) as the caller tokenized it


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class Close:
    pass


# -- worker -> parent ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ready:
    pid: int
    device: str
    threads: int | None


@dataclass(frozen=True)
class Failed:
    """The model could not be loaded: one sentence."""

    message: str


class ErrorKind(Enum):
    CONTEXT = "context"  # the conversation does not fit the context
    GUIDANCE = "guidance"  # an output constraint og cannot compile (before any prefill)
    INVALID = "invalid"  # another bad request
    INTERNAL = "internal"  # anything else, og's constrained decoder failing mid-answer too
    WORKER_DIED = "worker_died"  # the worker process ended while answering (seen by the parent)
    SHUTDOWN = "shutdown"  # the server stopped the request (SIGTERM's grace period ran out)

    @classmethod
    def of(cls, exc: BaseException) -> "ErrorKind":
        """The kind of an exception raised while answering (isinstance, most specific first)."""
        if isinstance(exc, ContextTooLong):
            return cls.CONTEXT
        if isinstance(exc, GuidanceError):
            return cls.GUIDANCE
        if isinstance(exc, GuidanceFailed):  # og's decoder failed mid-answer: not the client's fault
            return cls.INTERNAL
        if isinstance(exc, Phi3vError):
            return cls.INVALID
        return cls.INTERNAL


@dataclass(frozen=True)
class HttpError:
    """How the server answers an error of one kind: status and OpenAI's error type, param and code."""

    status: int
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


HTTP_ERRORS = {
    ErrorKind.CONTEXT: HttpError(400, param="messages", code="context_length_exceeded"),
    ErrorKind.INVALID: HttpError(400),
    ErrorKind.GUIDANCE: HttpError(400, param="response_format"),
    ErrorKind.SHUTDOWN: HttpError(503, "server_error"),
    ErrorKind.INTERNAL: HttpError(500, "server_error"),
    ErrorKind.WORKER_DIED: HttpError(500, "server_error"),
}


@dataclass(frozen=True)
class JobSummary:
    """What a worker did for one request (prompt_tokens / kv_reused come with its Finished event: a cancelled
    answer has none, and the server counts the prompt itself)."""

    prompt_tokens: int = 0
    generated: int = 0
    kv_reused: bool = False
    kept: bool = False
    cancelled: bool = False


@dataclass(frozen=True)
class Event:
    request_id: str
    event: TokenEvent | Notice | Finished


@dataclass(frozen=True)
class Error:
    request_id: str
    kind: ErrorKind
    message: str
    details: dict = field(default_factory=dict)  # context: requested, allowed; internal: traceback

    @classmethod
    def of(cls, request_id: str, exc: BaseException) -> "Error":
        """An exception raised while answering, as one message: a Phi3vError's sentence, else its type and text
        (cut at 500 characters) with the traceback in the details."""
        kind = ErrorKind.of(exc)
        if isinstance(exc, ContextTooLong):
            return cls(request_id, kind, str(exc), {"requested": exc.requested, "allowed": exc.allowed})
        if isinstance(exc, Phi3vError):
            return cls(request_id, kind, str(exc))
        return cls(request_id, kind, f"{type(exc).__name__}: {str(exc).strip()[:500]}",
                   {"traceback": traceback.format_exc(limit=5)})

    @property
    def http(self) -> HttpError:
        return HTTP_ERRORS[self.kind]


@dataclass(frozen=True)
class End:
    request_id: str
    summary: JobSummary = JobSummary()


Reply = Event | Error | End


def batch_error(error: Error) -> str:
    """A batch item's `error` text for a worker's error. A constraint og cannot compile is the same for every
    item: it stops the run instead (raised as the GuidanceError it was, before any prefill)."""
    if error.kind is ErrorKind.GUIDANCE:
        raise GuidanceError(error.message)
    return error.message
