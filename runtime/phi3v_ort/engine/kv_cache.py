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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from phi3v_ort.errors import ContextTooLong, SettingError

if TYPE_CHECKING:
    from phi3v_ort.package.loading import PackageInfo

CUDA_GRAPH_DEFAULT = False


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


def cannot_fit(prompt_tokens: int, context: int) -> str:
    """The sentence for a prompt with no room for even one new token (also what a client of a server says)."""
    return (f"the prompt is {prompt_tokens} tokens (images included) but the model's context is {context}: it "
            "cannot fit with even one new token")


def plan(info: "PackageInfo", prompt_tokens: int, max_new_tokens: int, policy: KVCachePolicy = KVCachePolicy()) -> KVPlan:
    """Size the cache for one request, or refuse a prompt that cannot fit the context."""
    if prompt_tokens + 1 > info.context_length:
        raise ContextTooLong(cannot_fit(prompt_tokens, info.context_length), prompt_tokens + max_new_tokens,
                             info.context_length)
    max_length = min(prompt_tokens + max_new_tokens, info.context_length)
    return KVPlan(max_length=max_length, share_buffer=policy.share_buffer, bytes=kv_cache_bytes(info, max_length))
