"""A conversation that keeps one og.Generator (and its KV cache) alive across turns.

og's own example throws the generator away after every turn and re-encodes the image and the whole transcript,
so each turn pays the full time to first token again (> 1,900 image tokens per image). Here a later turn appends
only its own tokens to the kept generator.

What og 0.18 does, measured on the fixture (tests/engine/test_conversation.py checks each point):
- `set_inputs()` runs the prefill at once. `generate_next_token()` appends the chosen token to the sequence but
  computes its KV only when logits are next needed (the next `generate_next_token()`, or `get_logits()`);
  `append_tokens()` does not do that first. A turn cut by its token budget therefore ends with a token that is in
  the sequence but not in the cache, and appending the next turn straight away leaves a hole there: the next
  turn's logits match neither the transcript with that token nor without it. The conversation calls
  `get_logits()` first, which feeds it.
- A turn that ends on `<|end|>` is different: og marks the generator done and does not append `<|end|>` to the
  sequence at all, and the token before it is already fed. Calling `get_logits()` there would feed `<|end|>` at a
  position the sequence does not have (the next turn's logits are then off), so nothing is flushed; `append_tokens`
  revives the generator. Either way the next turn starts with `<|end|>\n<|user|>\n...`, and its tokens equal a fresh
  prefill of the whole transcript (exactly, on the fixture; tests/engine/test_conversation.py checks both endings).
- A later turn that brings a new image cannot continue the generator: `set_inputs()` on a live generator and
  `append_tokens()` with image ids both fail in the embedding model (the vision model runs only for the first
  inputs). Such a turn re-prefills the transcript with all images, and says so.
- `Generator.rewind_to` is not supported for phi3v, so nothing here relies on it.
- An output constraint (settings.guidance) is fixed when a generator is created: a turn that changes it (or turns
  it on or off) re-prefills, and so does a constrained turn after an answer cut mid-structure (guidance.py).

Budget: the generator's max_length is fixed when it is created (the shared KV buffer is allocated at that size):
prompt tokens + max_new_tokens + `reserve_tokens` (default 2048, room for follow-up turns), capped at the
context; kv_cache.py makes every sizing decision (the buffer, the reserve, what fits). When the next turn would not
fit, the conversation starts a fresh generator with the transcript
re-prefilled; with `drop_old_turns` (the chat) it drops the oldest turns (with their images) until it fits and says
so, without it (the server, where the client owns the history) it refuses with ContextTooLong. A turn that cannot
fit even alone is refused and the history is kept.

Prompts are segments (prompt.py) tokenized by the runtime (tokens.py): the continuation's ids are exactly the
suffix a fresh prefill of the whole transcript would have, and answers generated here stay as their own ids, so a
re-prefill reads exactly what the kept cache holds. A caller that has already tokenized the transcript (the server,
which counts it to check the context) hands its ids to `ask(tokens=...)`: they are fed as they are, never
tokenized again; the cache then holds the earlier answers as that text's tokens, and the turns say so.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from phi3v_ort.errors import ContextTooLong
from phi3v_ort.engine import kv_cache
from phi3v_ort.engine.generation import (Answer, Finished, GenerationStats, Notice, Prefilled, TokenEvent,
                                         decode_answer)
from phi3v_ort.engine.guidance import GuidanceFailed
from phi3v_ort.inputs.images import ImageInput
from phi3v_ort.inputs.pipeline import DEFAULT_PROCESSOR, make_pipeline
from phi3v_ort.engine.model import LoadedModel
from phi3v_ort.inputs.prompt import END, NEWLINE, Segment, Turn, system_turn, transcript, user_turn
from phi3v_ort.inputs.tokens import TranscriptIds
from phi3v_ort.engine.settings import GenerationSettings, create_generator, search_options

DEFAULT_RESERVE_TOKENS = kv_cache.CONVERSATION_RESERVE_TOKENS

__all__ = ["Conversation", "ContextTooLong", "Turn", "transcript", "DEFAULT_RESERVE_TOKENS"]


@dataclass
class _Live:
    """The kept generator and its fixed budget."""

    generator: object
    kv: kv_cache.KVPlan
    sampling: tuple  # the og search options it was created with (other than its length): fixed for its life
    unfed_last_token: bool = False  # the last turn was cut by its budget: its last token still needs feeding

    @property
    def max_length(self) -> int:
        return self.kv.max_length

    @property
    def seq_len(self) -> int:
        return len(self.generator.get_sequence(0))


class Conversation:
    """Turns about images, streamed as the same events as generation.stream()."""

    def __init__(self, model: LoadedModel, settings: GenerationSettings = GenerationSettings(),
                 system: str | None = None, reserve_tokens: int = DEFAULT_RESERVE_TOKENS,
                 processor: str = DEFAULT_PROCESSOR, crops: int | None = None, drop_old_turns: bool = True):
        self.model = model
        self.settings = settings
        self.system = system
        system_turn(system)  # refuses image tags in the system message now, not at the first question
        self.reserve_tokens = reserve_tokens
        self.pipeline = make_pipeline(model.builder, processor, crops)
        self.drop_old_turns = drop_old_turns
        self.turns: list[Turn] = []
        self.last_stats: GenerationStats | None = None
        self._live: _Live | None = None

    def prepare_image(self, image: ImageInput):
        """Decoded image -> what this conversation's pipeline feeds the model (checks it, at attach time)."""
        return self.pipeline.prepare_image(image)

    # -- public ------------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every turn and free the KV cache."""
        self.turns.clear()
        self.last_stats = None
        self._live = None

    def restore(self, system: str | None, turns: list[Turn]) -> None:
        """Continue an earlier conversation (engine/saved.py): its turns become the history, and the next question
        re-prefills them with a fresh generator (og cannot load a KV cache)."""
        system_turn(system)  # refuses image tags in the system message before anything changes
        self.reset()
        self.system = system
        self.turns = list(turns)

    @property
    def images(self) -> list:
        return [img for turn in self.turns for img in turn.images]

    def ask(self, question: str, images: Sequence = (),
            tokens: TranscriptIds | None = None) -> Iterator[TokenEvent | Notice | Finished]:
        """Answer the next user turn; continues the kept generator when it can, else re-prefills (with a Notice).
        `images`: ImageInputs, or what prepare_image made of them. `tokens`: the transcript of the turns so far
        and this one, already tokenized by the caller (the server's worker jobs)."""
        started = time.perf_counter()
        load_s = sum(img.load_s for img in images if isinstance(img, ImageInput))
        turn = Turn(question, [self.prepare_image(i) if isinstance(i, ImageInput) else i for i in images])
        user = user_turn(question, len(self.images) + 1, len(images))  # validates the user's own image tags
        continuation, reason = self._continuation(images, user, tokens)
        if continuation is not None:
            yield from self._continue(turn, continuation, started)
            return
        kept, ids = (self.turns, tokens.ids) if tokens is not None else self._fit(turn)  # refuses before changes
        if reason:
            yield Notice(f"re-prefilling the conversation: {reason}")
        yield from self._prefill(turn, kept, ids, started - load_s, reason, given=tokens is not None)

    def to_dict(self) -> dict:
        """The transcript, for /save."""
        return {"system": self.system,
                "turns": [{"question": t.question, "images": [i.source for i in t.images], "answer": t.answer,
                           "answer_ids": t.answer_ids} for t in self.turns],
                "last_stats": self.last_stats.to_dict() if self.last_stats else None}

    # -- the two ways a turn starts --------------------------------------------------------------------------------

    def _continuation(self, images: Sequence, user: list[Segment],
                      tokens: TranscriptIds | None) -> tuple[Sequence[int] | None, str | None]:
        """The tokens that continue the kept generator, or None and why it cannot be continued (None: no
        generator is kept)."""
        live = self._live
        if live is None:
            return None, None
        if images:
            return None, "a new image needs the vision model, which runs only on a fresh generator"
        if live.sampling[-1] != self._sampling()[-1]:
            return None, "the output constraint changed, and og fixes it when a generator is created"
        if live.sampling != self._sampling():
            return None, "the sampling settings changed, and og fixes them when a generator is created"
        if self.settings.guidance is not None and live.unfed_last_token:
            return None, "the last answer was cut before its output constraint was complete"
        ids = tokens.continuation if tokens is not None else None
        if ids is None:
            ids = self._continuation_ids(live, user)
        if not kv_cache.fits_kept(live.kv, live.seq_len, len(ids), self.settings.max_new_tokens):
            return None, f"the next turn would not fit the generator's budget of {live.max_length} tokens"
        return ids, None

    def _continuation_ids(self, live: _Live, user: list[Segment]) -> list[int]:
        """The next turn's tokens: `<|end|>` (never in og's sequence, see above), then the user turn; no BOS, as
        they continue the prompt's last chunk."""
        return self.model.builder.tokenizer.encode([END, NEWLINE, *user], start=False).tolist()

    def _continue(self, turn: Turn, ids: Sequence[int], started: float) -> Iterator[TokenEvent | Finished]:
        live = self._live
        assert live is not None
        t_prefill = time.perf_counter()
        try:
            if live.unfed_last_token:
                live.generator.get_logits()  # feeds the token that ended the last turn (og computes it lazily)
                live.unfed_last_token = False
            live.generator.append_tokens(np.asarray(ids, dtype=np.int32))
        except BaseException:  # Ctrl-C or an error mid-append: the cache may hold a turn the transcript lacks
            self._live = None  # the next turn re-prefills from the transcript
            raise
        yield from self._decode(turn, live, Prefilled(len(ids), (), t_prefill - started, t_prefill, kv_reused=True))

    def _prefill(self, turn: Turn, kept: list[Turn], ids: np.ndarray | None, started: float, reason: str | None,
                 given: bool = False) -> Iterator[TokenEvent | Notice | Finished]:
        self._live = None  # free the old cache before allocating the new one
        images = [img for t in kept for img in t.images] + turn.images
        inputs = self.pipeline.inputs(self._transcript(kept, turn), images, self.model, ids)
        kv = kv_cache.plan(self.model.info, inputs.prompt_tokens, self.settings.max_new_tokens, self.model.policy,
                           self.reserve_tokens, subject="the conversation")
        generator = create_generator(self.model.og_model, self.settings, kv.max_length,
                                     kv.share_buffer)  # compiles a constraint, before the prefill
        t_prefill = time.perf_counter()
        generator.set_inputs(inputs.to_og())
        self._live = _Live(generator=generator, kv=kv, sampling=self._sampling())
        if given:  # the cache holds the caller's tokens of the earlier answers: their text, not ids generated here
            for t in kept:
                t.answer_ids = []
        if len(kept) < len(self.turns):  # only now: a prefill interrupted before this point drops nothing
            dropped = len(self.turns) - len(kept)
            self.turns = kept
            yield Notice(f"dropped the {dropped} oldest turn(s) to fit the context")
        request = Prefilled(inputs.prompt_tokens, inputs.image_tokens, t_prefill - started, t_prefill,
                            reprefill_reason=reason)
        yield from self._decode(turn, self._live, request)

    # -- decoding ------------------------------------------------------------------------------------------------

    def _decode(self, turn: Turn, live: _Live, request: Prefilled) -> Iterator[TokenEvent | Finished]:
        """The turn's answer through generation's core; the turn keeps what og holds, also after an early stop."""
        self.turns.append(turn)  # part of the transcript from now on, even if the consumer stops early
        turn_start = live.seq_len
        answer = Answer()
        settled = False

        def settle() -> None:  # what og holds is the truth, also after Ctrl-C or an abandoned stream
            nonlocal settled
            settled = True
            turn.answer = answer.text
            turn.answer_ids = [int(t) for t in live.generator.get_sequence(0)[turn_start:]]
            live.unfed_last_token = bool(answer.token_ids) and answer.token_ids[-1] != self.model.info.eos_token_id

        try:
            events = decode_answer(self.model, live.generator, live.kv, request, answer, self.settings.max_new_tokens)
            while True:
                try:
                    event = next(events)
                except StopIteration as done:
                    finished: Finished = done.value
                    break
                turn.answer = answer.text
                yield event
        except GuidanceFailed:  # og's constraint state is broken: the next turn starts a fresh generator
            self._live = None
            raise
        finally:
            if not settled:
                settle()
        self.last_stats = finished.stats
        yield Finished(text=turn.answer, token_ids=finished.token_ids, prompt="", stats=finished.stats)

    def _sampling(self) -> tuple:
        """What a generator is created with besides its length: the search options, then the output constraint
        (last: ask() names a changed constraint as such)."""
        options = search_options(self.settings, 0, self.model.policy.share_buffer)
        return tuple(sorted((k, v) for k, v in options.items() if k not in ("max_length", "min_length"))) + (
            ("guidance", self.settings.guidance),)

    # -- transcript --------------------------------------------------------------------------------------------

    def _transcript(self, turns: list[Turn], new: Turn) -> list[Segment]:
        return transcript(self.system, turns, new)

    def count_tokens(self, turns: list[Turn], new: Turn) -> int:
        """Prompt tokens of a transcript, exactly, without building pixels."""
        return len(self._tokenize(turns, new))

    def _tokenize(self, turns: list[Turn], new: Turn) -> np.ndarray:
        images = [img for t in turns for img in t.images] + new.images
        return self.model.builder.tokenizer.encode(self._transcript(turns, new),
                                                   [self.pipeline.image_tokens(i) for i in images])

    def _fit(self, new: Turn) -> tuple[list[Turn], np.ndarray]:
        """The most recent past turns that fit the context with the new turn and its answer (kv_cache.prompt_budget),
        and their transcript's ids; with drop_old_turns off, all of them or ContextTooLong. Nothing changes here:
        the caller applies it."""
        context = self.model.info.context_length
        budget = kv_cache.prompt_budget(context, self.settings.max_new_tokens)
        least = self.model.builder.tokenizer.min_tokens(len(new.question))
        if least > budget:  # known from its length alone: never tokenize a 50 MB question (73 s, 6.9 GB) to see it
            raise ContextTooLong(f"this turn alone is {len(new.question):,} characters, at least {least:,} prompt "
                                 f"tokens, but the model's context is {context} tokens",
                                 least + self.settings.max_new_tokens, context)
        kept = list(self.turns)
        ids = self._tokenize(kept, new)
        if len(ids) > budget and not self.drop_old_turns:
            raise ContextTooLong(f"the conversation needs {len(ids)} prompt tokens + {self.settings.max_new_tokens} "
                                 f"for the answer, but the model's context is {context} tokens",
                                 len(ids) + self.settings.max_new_tokens, context)
        while kept and len(ids) > budget:
            kept.pop(0)
            ids = self._tokenize(kept, new)
        if len(ids) > budget:
            raise ContextTooLong(f"this turn alone needs {len(ids)} prompt tokens + {self.settings.max_new_tokens} "
                                 f"for the answer, but the model's context is {context} tokens: the conversation "
                                 "is kept as it was", len(ids) + self.settings.max_new_tokens, context)
        return kept, ids
