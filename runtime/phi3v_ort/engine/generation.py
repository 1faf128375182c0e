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
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from phi3v_ort.inputs.images import ImageInput
from phi3v_ort.inputs.pipeline import DEFAULT_PROCESSOR, ModelInputs, make_pipeline
from phi3v_ort.engine.kv_cache import plan
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
    """The generation loop for a prepared request."""
    kv = plan(model.info, prepared.prompt_tokens, settings.max_new_tokens, model.policy)  # refuses before allocating
    generator = create_generator(model.og_model, settings, kv.max_length, kv.share_buffer)  # compiles a constraint
    eos = model.info.eos_token_id
    tokens: list[int] = []
    pieces: list[str] = []
    try:
        t_prefill = time.perf_counter()
        generator.set_inputs(prepared.to_og())
        clock = DecodeClock(t_prefill, t_prefill)
        for event in decode_tokens(generator, model.tokenizer, eos, clock=clock):
            tokens.append(event.token_id)
            pieces.append(event.text)
            yield event
    finally:
        del generator  # frees the KV cache at once, also when the consumer stops early

    t_first, t_last = clock.t_first, clock.t_last
    prefill_s = t_first - t_prefill
    decode_s = t_last - t_first
    stats = GenerationStats(
        prompt_tokens=prepared.prompt_tokens, image_tokens=prepared.image_tokens,
        preprocess_s=prepared.preprocess_s, prefill_s=prefill_s,
        time_to_first_token_s=prepared.preprocess_s + prefill_s,
        prefill_tokens_per_s=prepared.prompt_tokens / prefill_s if prefill_s > 0 else 0.0,
        decode_s=decode_s,
        decode_tokens_per_s=(len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0,
        generated_tokens=len(tokens), finish_reason="stop" if tokens and tokens[-1] == eos else "length",
        max_length=kv.max_length, share_buffer=kv.share_buffer, cuda_graph=model.cuda_graph,
        kv_cache_bytes=kv.bytes, device=model.device, **model_timings(model, prefill_s),
    )
    yield Finished(text="".join(pieces), token_ids=tuple(tokens), prompt=prepared.prompt, stats=stats)


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
