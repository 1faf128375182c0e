"""Choosing the next token from logits, for the paths that cannot let og sample (see conversation.py).

Greedy is argmax, exactly og's greedy. Sampling follows the usual order: repetition penalty, temperature,
top-k, top-p, then a draw from a seeded numpy generator (its random stream is not og's, so a seeded sampled
conversation repeats itself but does not match a seeded `phi3v-ort run`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .settings import GenerationSettings

Sampler = Callable[[np.ndarray, Sequence[int]], int]


def make_sampler(settings: GenerationSettings) -> Sampler:
    """A function (logits, tokens so far) -> next token id, built once per request."""
    rng = np.random.default_rng(settings.seed)

    def sample(logits: np.ndarray, history: Sequence[int]) -> int:
        scores = np.asarray(logits, dtype=np.float64).reshape(-1)
        if settings.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray([t for t in history if 0 <= t < scores.size], dtype=np.int64))
            values = scores[seen]
            scores[seen] = np.where(values > 0, values / settings.repetition_penalty,
                                    values * settings.repetition_penalty)
        if not settings.do_sample:
            return int(np.argmax(scores))
        scores = scores / settings.temperature
        if settings.top_k < scores.size:
            kth = np.partition(scores, -settings.top_k)[-settings.top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if settings.top_p < 1.0:
            order = np.argsort(-probs)
            keep = np.cumsum(probs[order]) - probs[order] < settings.top_p  # always keeps the top token
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(rng.choice(probs.size, p=probs))

    return sample
