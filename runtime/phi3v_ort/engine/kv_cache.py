"""KV-cache decisions, in one place, each with the measurement behind it.

- max_length = prompt tokens + max_new_tokens, capped at the context length. og's default is the context
  (131072), which with the shared buffer preallocates 2 * 32 layers * 32 heads * 96 * 131072 * 2 bytes
  = 48 GiB for the real model before the first token.
- past_present_share_buffer (one static buffer of max_length, written in place) is on by default. Measured on
  the `small` package, 2-core CPU, 128 new tokens (benchmarks/results/runtime-overhead-cpu-small.md): decode
  75.1 vs 35.3 tokens/s after a one-image prompt (1941 tokens), 121.5 vs 115.9 text-only: without it og
  copies the whole past into a new present every step, so the cost grows with the prompt.
- CUDA graphs (og >= 0.14) are an opt-in on CUDA; no GPU was available to measure them, so they stay off.
- A prompt that cannot fit (prompt + 1 token > context) is refused before anything is allocated.
- A conversation's generator is kept across turns, so its buffer gets a reserve for the follow-ups beyond this
  answer: 2048 tokens in `chat` (`--reserve-tokens`); for a worker's conversation (server, local batch, Ray) as much
  as the answer again plus 256, at most 4096, so a short answer does not pin a 2048-token buffer in every kept
  conversation and a long one cannot claim the whole context. A turn that would overflow the kept buffer starts
  a fresh generator (conversation.py).
- A conversation keeps at most the context less the answer's budget (capped at half the context, so a huge
  max_new_tokens never leaves no room for the prompt) as its prompt; older turns are dropped or refused beyond.
- The server caps max_tokens (`serve --max-tokens-limit`, 4096 by default) and refuses a request whose buffer
  would take more than half the memory the machine has available (KV_MEMORY_FRACTION; on the CPU, where og
  allocates it from system memory: og 0.18 does not report free GPU memory, so a CUDA server checks only the cap).
- `run` (a single answer) has no reserve: its buffer is exactly prompt + max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from phi3v_ort.errors import ContextTooLong, SettingError

if TYPE_CHECKING:
    from phi3v_ort.package.loading import PackageInfo

CUDA_GRAPH_DEFAULT = False
CONVERSATION_RESERVE_TOKENS = 2048  # chat's room for follow-up turns in the kept buffer
JOB_RESERVE_EXTRA = 256  # a worker's conversation: the answer's budget again plus this ...
JOB_RESERVE_MAX = 4096  # ... at most this
KV_MEMORY_FRACTION = 0.5  # the most of the available memory one server request's KV buffer may take


@dataclass(frozen=True)
class KVCachePolicy:
    """How the KV cache is managed for every request of a session."""

    share_buffer: bool = True
    cuda_graph: bool = CUDA_GRAPH_DEFAULT  # applied when the model is loaded on CUDA; ignored on the CPU

    def __post_init__(self) -> None:
        if self.cuda_graph and not self.share_buffer:
            raise SettingError("CUDA graphs need the shared KV buffer: drop --no-share-buffer or --cuda-graph")


@dataclass(frozen=True)
class KVPlan:
    """The cache of one request: its length, its mode and what it costs."""

    max_length: int
    share_buffer: bool
    bytes: int  # allocated up front with the shared buffer; the most it grows to without it


def kv_cache_bytes(info: "PackageInfo", length: int, batch: int = 1) -> int:
    """Keys + values of every layer for `length` positions."""
    return 2 * info.num_layers * batch * info.num_kv_heads * length * info.head_size * info.dtype_bytes


def cannot_fit(prompt_tokens: int, context: int, subject: str = "the prompt") -> str:
    """The sentence for a prompt (or conversation) with no room for even one new token (also what a client of a
    server says)."""
    return (f"{subject} is {prompt_tokens} tokens (images included) but the model's context is {context}: it "
            "cannot fit with even one new token")


def plan(info: "PackageInfo", prompt_tokens: int, max_new_tokens: int, policy: KVCachePolicy = KVCachePolicy(),
         reserve_tokens: int = 0, subject: str = "the prompt") -> KVPlan:
    """Size the cache for one request (reserve 0) or a conversation's generator (prompt + answer + the reserve for
    follow-up turns), capped at the context; refuse a prompt that cannot fit (ContextTooLong naming `subject`)."""
    if prompt_tokens + 1 > info.context_length:
        raise ContextTooLong(cannot_fit(prompt_tokens, info.context_length, subject), prompt_tokens + max_new_tokens,
                             info.context_length)
    max_length = min(prompt_tokens + max_new_tokens + max(0, reserve_tokens), info.context_length)
    return KVPlan(max_length=max_length, share_buffer=policy.share_buffer, bytes=kv_cache_bytes(info, max_length))


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux's MemAvailable: free + reclaimable cache), None when the
    system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_refusal(need: int, available: int | None, max_length: int) -> str | None:
    """Why a KV buffer of `need` bytes must not be allocated (None: it may), with KV_MEMORY_FRACTION of what is
    available as the most one request's buffer may take: the weights, activations and other requests need the rest,
    and a buffer the machine cannot hold ends the worker (or the machine), not the request."""
    if available is None or need <= available * KV_MEMORY_FRACTION:
        return None
    return (f"the answer's KV cache would need {need / 2**20:,.0f} MiB ({max_length} positions) but this machine has "
            f"{available / 2**20:,.0f} MiB available: ask for fewer max_tokens or send a shorter conversation")


def job_reserve(max_new_tokens: int) -> int:
    """The follow-up reserve of a worker's conversation (server, local batch, Ray batch)."""
    return min(max_new_tokens + JOB_RESERVE_EXTRA, JOB_RESERVE_MAX)


def fits_kept(kv: KVPlan, sequence_tokens: int, new_tokens: int, max_new_tokens: int) -> bool:
    """Whether a turn of `new_tokens` and its answer fit the kept generator's fixed buffer."""
    return sequence_tokens + new_tokens + max_new_tokens <= kv.max_length


def prompt_budget(context_length: int, max_new_tokens: int) -> int:
    """The most prompt tokens a conversation keeps: the context less the answer's room (at most half of it)."""
    return context_length - min(max_new_tokens, context_length // 2)


def answer_budget(context_length: int, prompt_tokens: int, wanted: int) -> int:
    """A server request's max_new_tokens: what the client asked for, cut to what the context leaves."""
    return min(wanted, context_length - prompt_tokens)
