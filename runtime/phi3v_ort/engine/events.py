"""What generation yields (generation.py, conversation.py, the worker processes, a server's client): a
`TokenEvent` per token, `Notice`s, and one `Finished` with the answer and its `GenerationStats`. Plain dataclasses
with no heavy import, so a client of a running server (client/answer.py) starts without numpy or onnxruntime."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TokenEvent:
    text: str  # what this token adds to the answer (may be "" while a multi-byte character is incomplete)
    token_id: int


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    image_tokens: tuple[int, ...]  # one entry per image, in order
    preprocess_s: float
    prefill_s: float
    time_to_first_token_s: float
    prefill_tokens_per_s: float
    decode_s: float
    decode_tokens_per_s: float
    generated_tokens: int
    finish_reason: str  # "stop" (end token) or "length" (max_new_tokens or the context)
    max_length: int
    share_buffer: bool
    cuda_graph: bool
    kv_cache_bytes: int
    device: str
    kv_reused: bool = False  # a conversation turn that continued the kept generator
    reprefill_reason: str | None = None  # why a conversation turn started a fresh generator instead
    load_s: float | None = None  # the model's load time (in-process: load_model's; a server: its own load)
    warm: bool = False  # the model was already loaded (a running server answered; False in-process)
    # = prefill_s, under a name that says what it holds: og runs the vision model (with images), the embedding and
    # the decoder's prefill (and the first token) in one call, so they cannot be timed apart in-process
    vision_embedding_prefill_s: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_tokens"] = list(self.image_tokens)
        return d


@dataclass(frozen=True)
class Notice:
    """Something the caller should know about this answer (e.g. a conversation re-prefilled its transcript)."""

    message: str


@dataclass(frozen=True)
class Finished:
    text: str
    token_ids: tuple[int, ...]
    prompt: str
    stats: GenerationStats


def prompt_time(stats: GenerationStats) -> str:
    """The time to first token's parts in words (for --stats). og runs the vision model, the embedding and the
    decoder's prefill in one call, so an image prompt's tokens per second would be no decoder speed: only a text
    prompt's is shown."""
    prompt = f"{stats.vision_embedding_prefill_s * 1000:.1f} ms"
    if stats.image_tokens:
        return f"preprocessing {stats.preprocess_s * 1000:.1f} ms + vision, embedding and prefill {prompt}"
    return f"embedding and prefill {prompt}, {stats.prefill_tokens_per_s:.1f} tokens/s"
