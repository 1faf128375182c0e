"""Generation: one Python generator of events that the CLI, server, benchmarks and tests all consume.

`stream()` yields a `TokenEvent` per generated token (its text delta from og's TokenizerStream and its id) and
ends with one `Finished` carrying the whole answer and its `GenerationStats`. `generate()` runs it to the end.

Timing boundaries (the same ones the benchmarks use):
- preprocess_s: image loading (Pillow) + input preparation (the runtime's pipeline, or og's processor);
- prefill_s: set_inputs + the first generate_next_token (vision model, embedding, decoder prefill, first token);
  og runs all three inside those calls, so they cannot be told apart here: the stats also carry this time as
  `vision_embedding_prefill_s`, a name that says what it holds, and `prefill_tokens_per_s` (the prompt's tokens
  over that time) is no decoder speed for an image prompt. `phi3v-ort bench` runs the vision model alone to
  report the vision time separately;
- time_to_first_token_s = preprocess_s + prefill_s;
- decode: every later token, from the first token to the last;
- load_s: how long loading the model took (once per process, not part of any request), and `warm`: whether the
  model was already loaded when the request came (False in-process: the command loaded it).
A conversation's turn (conversation.py) has the same boundaries: its preprocess_s is everything before its prefill
(image preparation, tokenization, creating the generator), its prefill the transcript or only the appended turn.
Both run through `decode_answer` and get their stats from `measure_stats`.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field

from phi3v_ort.inputs.images import ImageInput
from phi3v_ort.inputs.pipeline import DEFAULT_PROCESSOR, ModelInputs, make_pipeline
from phi3v_ort.engine.kv_cache import KVPlan, plan
from phi3v_ort.engine.model import LoadedModel
from phi3v_ort.inputs.prompt import build_prompt
from phi3v_ort.engine.guidance import decode_failure, is_guidance_failure
from phi3v_ort.engine.settings import GenerationSettings, create_generator
from phi3v_ort.engine.events import Finished, GenerationStats, Notice, TokenEvent  # noqa: F401 (their home was here)


def prepare(model: LoadedModel, question: str, images: Sequence[ImageInput] = (), system: str | None = None,
            processor: str = DEFAULT_PROCESSOR, crops: int | None = None) -> ModelInputs:
    """Prompt + images -> the model's inputs, with the token counts (prompt.build_prompt builds every prompt;
    inputs.make_pipeline chooses the processor)."""
    pipeline = make_pipeline(model.builder, processor, crops)
    prepared = [pipeline.prepare_image(img) for img in images]
    inputs = pipeline.inputs(build_prompt(question, len(images), system), prepared, model)
    inputs.preprocess_s += sum(img.load_s for img in images)
    return inputs


def stream(model: LoadedModel, question: str, images: Sequence[ImageInput] = (),
           settings: GenerationSettings = GenerationSettings(), system: str | None = None,
           processor: str = DEFAULT_PROCESSOR, crops: int | None = None) -> Iterator[TokenEvent | Finished]:
    """Generate an answer about `images`, one event per token, then a `Finished` with the stats."""
    yield from stream_prepared(model, prepare(model, question, images, system, processor, crops), settings)


def stream_prepared(model: LoadedModel, prepared: ModelInputs,
                    settings: GenerationSettings = GenerationSettings()) -> Iterator[TokenEvent | Finished]:
    """A single answer for a prepared request: a generator sized exactly prompt + max_new_tokens (no reserve), freed
    as soon as the answer ends (also when the consumer stops early)."""
    kv = plan(model.info, prepared.prompt_tokens, settings.max_new_tokens, model.policy)  # refuses before allocating
    generator = create_generator(model.og_model, settings, kv.max_length, kv.share_buffer)  # compiles a constraint
    try:
        t_prefill = time.perf_counter()
        generator.set_inputs(prepared.to_og())
        request = Prefilled(prepared.prompt_tokens, prepared.image_tokens, prepared.preprocess_s, t_prefill,
                            prompt=prepared.prompt)
        finished = yield from decode_answer(model, generator, kv, request)
    finally:
        del generator  # frees the KV cache at once
    yield finished


@dataclass(frozen=True)
class Prefilled:
    """What a request fed the generator, and when: the facts its stats start from."""

    prompt_tokens: int  # the tokens this request prefilled (a conversation's continuation: only its own)
    image_tokens: tuple[int, ...]
    preprocess_s: float  # everything before the prefill started (image loading, preparation, tokenization)
    t_prefill: float  # perf_counter() when the prefill started
    prompt: str = ""
    kv_reused: bool = False
    reprefill_reason: str | None = None


@dataclass
class Answer:
    """The answer so far: the caller keeps it when the stream stops early (Ctrl-C, a client gone)."""

    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def decode_answer(model: LoadedModel, generator, kv: KVPlan, request: Prefilled, answer: Answer | None = None,
                  max_new_tokens: int | None = None) -> Generator[TokenEvent, None, Finished]:
    """The core every answer runs through (run, bench, chat, the workers): decode a prefilled generator, one
    TokenEvent per token, and return the Finished answer with its stats (measure_stats)."""
    answer = Answer() if answer is None else answer
    clock = DecodeClock(request.t_prefill, request.t_prefill)
    for event in decode_tokens(generator, model.tokenizer, model.info.eos_token_id, max_new_tokens, clock):
        answer.token_ids.append(event.token_id)
        answer.pieces.append(event.text)
        yield event
    stats = measure_stats(model, kv, request, clock, answer.token_ids)
    return Finished(text=answer.text, token_ids=tuple(answer.token_ids), prompt=request.prompt, stats=stats)


def measure_stats(model: LoadedModel, kv: KVPlan, request: Prefilled, clock: "DecodeClock",
                  tokens: Sequence[int]) -> GenerationStats:
    """The one stats builder. time_to_first_token_s = preprocess_s + prefill_s (prefill: set_inputs or the
    appended turn, through the first token); decode: from the first token to the last."""
    eos = model.info.eos_token_id
    prefill_s = clock.t_first - request.t_prefill
    decode_s = clock.t_last - clock.t_first
    return GenerationStats(
        prompt_tokens=request.prompt_tokens, image_tokens=request.image_tokens, preprocess_s=request.preprocess_s,
        prefill_s=prefill_s, time_to_first_token_s=request.preprocess_s + prefill_s,
        prefill_tokens_per_s=request.prompt_tokens / prefill_s if prefill_s > 0 else 0.0,
        decode_s=decode_s,
        decode_tokens_per_s=(len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0,
        generated_tokens=len(tokens), finish_reason="stop" if tokens and tokens[-1] == eos else "length",
        max_length=kv.max_length, share_buffer=kv.share_buffer, cuda_graph=model.cuda_graph,
        kv_cache_bytes=kv.bytes, device=model.device, kv_reused=request.kv_reused,
        reprefill_reason=request.reprefill_reason, **model_timings(model, prefill_s))


def model_timings(model: LoadedModel, prefill_s: float) -> dict:
    """The GenerationStats fields about the model rather than the request, and the prompt's time by its name."""
    return {"vision_embedding_prefill_s": prefill_s, "load_s": model.load_s, "warm": model.warm}


@dataclass
class DecodeClock:
    t_first: float
    t_last: float


def decode_tokens(generator, tokenizer, eos: int, max_new_tokens: int | None = None,
                  clock: DecodeClock | None = None) -> Iterator[TokenEvent]:
    """og's decode loop, shared by single requests and conversations: `generate_next_token` until og is done (or
    `max_new_tokens`), one TokenEvent each. The end token gets no text; the answer's first piece loses
    SentencePiece's word marker (HF's decoder strips it too). `clock` gets the first and last token's times."""
    stream = tokenizer.create_stream()
    at_start = True
    count = 0
    while not generator.is_done() and (max_new_tokens is None or count < max_new_tokens):
        try:
            generator.generate_next_token()
        except RuntimeError as exc:  # og's constrained decoder (llguidance) can fail mid-answer: one sentence
            if is_guidance_failure(exc):
                raise decode_failure(exc, count) from None
            raise
        token = int(generator.get_next_tokens()[0])
        if clock is not None:
            clock.t_last = time.perf_counter()
            if count == 0:
                clock.t_first = clock.t_last
        count += 1
        text = "" if token == eos else stream.decode(token)
        if at_start and text:
            text, at_start = text.removeprefix(" "), False
        yield TokenEvent(text=text, token_id=token)


def generate(model: LoadedModel, question: str, images: Sequence[ImageInput] = (),
             settings: GenerationSettings = GenerationSettings(), system: str | None = None,
             processor: str = DEFAULT_PROCESSOR, crops: int | None = None) -> Finished:
    """The whole answer at once."""
    for event in stream(model, question, images, settings, system, processor, crops):
        if isinstance(event, Finished):
            return event
    raise AssertionError("stream() ended without a Finished event")
