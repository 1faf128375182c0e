"""The public Python API: load a model once, then ask about images, stream answers, chat, or look at the inputs.

    import phi3v_ort

    with phi3v_ort.load("phi-3-vision") as model:          # a catalog name (fetched on first use) or a folder
        answer = model.ask("Could you please introduce this stock to me?", images=["examples/chart.png"])
        print(answer.text)

The engine underneath is the command line's: `ask` and `stream` prepare and generate through engine.generation
exactly as `phi3v-ort run` does, and a `Chat` is the engine.conversation.Conversation of `phi3v-ort chat` (one
og generator and its KV cache kept between turns). So the same greedy request gives the same tokens here, in
`run`, `chat`, `batch` and the server (tests/api/test_same_tokens.py). Settings are checked by the same functions
as the CLI's options (engine.settings.make_settings, guidance, stop), with the same one-sentence messages; every
expected failure is a `phi3v_ort.Phi3vError` (subclasses: ContextTooLong, ImageError, SettingError,
ConstraintError).

Heavy imports (numpy, Pillow, onnxruntime-genai) wait until a model is loaded: `import phi3v_ort` stays cheap
for the CLI, which imports this package too.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from phi3v_ort.engine.kv_cache import CONVERSATION_RESERVE_TOKENS
from phi3v_ort.errors import Phi3vError, SettingError

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from phi3v_ort.engine.conversation import Conversation
    from phi3v_ort.engine.generation import GenerationStats
    from phi3v_ort.engine.guidance import Guidance
    from phi3v_ort.engine.model import LoadedModel
    from phi3v_ort.engine.settings import GenerationSettings
    from phi3v_ort.inputs.images import ImageInput, ImageLike

DEFAULT_MODEL = "phi-3-vision"
DEFAULT_MAX_NEW_TOKENS = 512  # as `phi3v-ort run --max-new-tokens`


class Settings(TypedDict, total=False):
    """The keyword settings of `ask` and `stream` (on a Model and on a Chat); any left out keeps its default.

    Greedy decoding unless temperature, top_p or top_k is given (as the CLI). At most one output constraint.
    """

    max_new_tokens: int  # the most tokens the answer may have (default 512)
    temperature: float  # sample with this temperature (> 0)
    top_p: float  # sample from the likeliest tokens whose probabilities add up to top_p (0 < top_p <= 1)
    top_k: int  # sample from the top_k likeliest tokens
    seed: int  # the sampler's seed (0 to 2**31 - 1)
    crops: int  # crop budget per image, 1-16 (default: the model's, set by load)
    json_schema: dict | str  # constrain the answer to JSON following this schema (a dict or JSON text)
    json_object: bool  # constrain the answer to a JSON object
    regex: str  # constrain the answer to match this regex (\d means [0-9])
    grammar: str  # constrain the answer to this Lark grammar (llguidance's dialect), as text
    stop: str | Sequence[str]  # up to 4 strings; the answer ends before the first one (OpenAI's `stop`)


SETTING_NAMES = tuple(Settings.__annotations__)


@dataclass(frozen=True)
class Answer:
    """One answer, with what it cost.

    `prompt_tokens` counts what the answer was conditioned on (for a chat: the whole conversation so far, as the
    server's usage counts it); `stats.prompt_tokens` what was prefilled for it (a chat turn that continued the
    kept KV cache prefills only its own tokens). `stats` is None when a stop string ended the answer: generation
    was cut there, before the engine's stats. `parsed` is the JSON value of a complete json_schema/json_object
    answer; `problem` says why a constrained answer is not complete (cut by max_new_tokens), else None.
    `notices`: what a chat did on its own (re-prefilled the transcript, dropped old turns to fit the context).

    >>> answer = model.ask("What is shown?", images=["examples/chart.png"])  # doctest: +SKIP
    >>> answer.text, answer.finish_reason, answer.num_image_tokens           # doctest: +SKIP
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (the end token or a stop string) or "length" (max_new_tokens or the context)
    prompt_tokens: int
    num_image_tokens: tuple[int, ...]  # one entry per image of this question, in order
    stats: GenerationStats | None
    parsed: Any = None
    problem: str | None = None
    notices: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.text


class AnswerStream(Iterator[str]):
    """The answer's text pieces as they are generated; `.answer` is the whole Answer once it has ended.

    >>> stream = model.stream("Describe the image.", images=["examples/a.png"])  # doctest: +SKIP
    >>> for piece in stream:                                                      # doctest: +SKIP
    ...     print(piece, end="", flush=True)
    >>> stream.answer.stats.decode_tokens_per_s                                   # doctest: +SKIP

    Leaving the loop early (or `close()`) stops generating and frees the KV cache (a chat keeps the turn as far
    as it got). Pieces may be "" while a multi-byte character is incomplete only inside og; none is yielded empty.
    """

    def __init__(self, events: Iterator, stops: Sequence[str], guidance: Guidance | None,
                 counts: Callable[[], tuple[int, tuple[int, ...]]]):
        from phi3v_ort.engine.stop import StopStringFilter

        self._events = events
        self._stops = StopStringFilter(stops)
        self._guidance = guidance
        self._counts = counts
        self._pieces: list[str] = []
        self._ids: list[int] = []
        self._notices: list[str] = []
        self._stats: GenerationStats | None = None
        self._answer: Answer | None = None
        self._run = self._texts()

    def __iter__(self) -> AnswerStream:
        return self

    def __next__(self) -> str:
        return next(self._run)

    @property
    def answer(self) -> Answer:
        """The whole answer (reads the rest of the stream first, if any is left)."""
        for _ in self._run:
            pass
        if self._answer is None:
            raise Phi3vError("the answer was stopped before it ended: it has no result")
        return self._answer

    def close(self) -> None:
        """Stop generating now (frees the KV cache of a single answer)."""
        self._run.close()

    def _texts(self) -> Iterator[str]:
        from phi3v_ort.engine.generation import Finished, Notice

        try:
            for event in self._events:
                if isinstance(event, Notice):
                    self._notices.append(event.message)
                elif isinstance(event, Finished):
                    self._stats = event.stats
                else:
                    self._ids.append(event.token_id)
                    text = self._stops.feed(event.text)
                    if text:
                        self._pieces.append(text)
                        yield text
                    if self._stops.stopped:
                        break
            tail = self._stops.flush()
            if tail:
                self._pieces.append(tail)
                yield tail
        finally:
            self._events.close()  # a stop string, an early break or an error: generation ends here
        self._answer = self._result()

    def _result(self) -> Answer:
        from phi3v_ort.engine.guidance import outcome

        text = "".join(self._pieces)
        stopped = self._stops.stopped
        stats = None if stopped else self._stats
        finish = "stop" if stopped or stats is None else stats.finish_reason
        result = outcome(self._guidance, text, finish, len(self._ids), budget_hint="raise max_new_tokens")
        prompt_tokens, image_tokens = self._counts()
        return Answer(text=text, token_ids=tuple(self._ids), finish_reason=finish, prompt_tokens=prompt_tokens,
                      num_image_tokens=tuple(image_tokens), stats=stats,
                      parsed=result.parsed if result.has_parsed else None, problem=result.problem,
                      notices=tuple(self._notices))


@dataclass(frozen=True)
class _Request:
    """Keyword settings, checked: what the engine gets."""

    generation: GenerationSettings
    crops: int | None
    stops: list[str]


def _request(settings: dict) -> _Request:
    """The settings keywords -> engine settings, with the CLI's checks and messages (SettingError,
    ConstraintError)."""
    from phi3v_ort.engine import guidance
    from phi3v_ort.engine.settings import make_settings
    from phi3v_ort.engine.stop import check_stops

    unknown = sorted(set(settings) - set(SETTING_NAMES))
    if unknown:
        raise SettingError(f"unknown setting {unknown[0]!r}: choose from {', '.join(SETTING_NAMES)}")
    json_object = settings.get("json_object")
    if json_object is not None and not isinstance(json_object, bool):
        raise SettingError(f"json_object must be True or False, got {json_object!r}")
    crops = settings.get("crops")
    if crops is not None and (isinstance(crops, bool) or not isinstance(crops, int)):
        raise SettingError(f"crops must be an integer, got {crops!r}")
    constraint = guidance.from_values(settings.get("json_schema"), bool(json_object), settings.get("regex"),
                                      settings.get("grammar"))
    max_new_tokens = settings.get("max_new_tokens")
    generation = make_settings(DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
                               settings.get("temperature"), settings.get("top_p"), settings.get("top_k"),
                               settings.get("seed"), constraint)
    return _Request(generation, crops, check_stops(settings.get("stop")))


def _images(images: Any, allow_remote: bool) -> list[ImageInput]:
    """A list of images (or one image) -> decoded, checked ImageInputs, named images[i] in messages."""
    from phi3v_ort.inputs.images import to_image_input

    items = list(images) if isinstance(images, (list, tuple)) else [images]
    return [to_image_input(image, f"images[{i}]", allow_remote=allow_remote) for i, image in enumerate(items)]


def _check_question(question: Any) -> str:
    if not isinstance(question, str):
        raise Phi3vError(f"the question must be a string, got {type(question).__name__}")
    return question


class Chat:
    """A conversation about images that keeps the KV cache between turns, like `phi3v-ort chat`.

    A later turn without a new image appends only its own tokens to the kept cache; a turn with a new image (or
    other sampling settings, or another output constraint) re-prefills the transcript, and says so in
    `Answer.notices`. When the conversation outgrows the context, its oldest turns are dropped (also a notice).

    >>> chat = model.chat(system="Answer briefly.")                                  # doctest: +SKIP
    >>> chat.ask("What is in this picture?", images=["examples/a.png"]).text        # doctest: +SKIP
    >>> chat.ask("And the colours?").text                                           # doctest: +SKIP
    """

    def __init__(self, model: Model, conversation: Conversation):
        self._model = model
        self._conversation: Conversation | None = conversation

    @property
    def conversation(self) -> Conversation:
        """The engine's Conversation (its turns, its last stats)."""
        self._model._check_open()
        assert self._conversation is not None
        return self._conversation

    @property
    def history(self) -> list[tuple[str, str]]:
        """(question, answer) per turn kept, oldest first."""
        return [(turn.question, turn.answer) for turn in self.conversation.turns]

    def ask(self, question: str, images: ImageLike | Sequence[ImageLike] = (), *, allow_remote: bool = False,
            **settings: Unpack[Settings]) -> Answer:
        """Answer the next question of the conversation (images: a list, or one image).

        >>> chat.ask("And the title?", max_new_tokens=32).text    # doctest: +SKIP
        """
        return self.stream(question, images, allow_remote=allow_remote, **settings).answer

    def stream(self, question: str, images: ImageLike | Sequence[ImageLike] = (), *, allow_remote: bool = False,
               **settings: Unpack[Settings]) -> AnswerStream:
        """As `ask`, yielding the answer's text pieces as they are generated.

        >>> for piece in chat.stream("Describe it."):    # doctest: +SKIP
        ...     print(piece, end="", flush=True)
        """
        conversation = self.conversation
        request = _request(dict(settings))
        inputs = _images(images, allow_remote)
        attached: list = inputs
        if request.crops is not None and request.crops != conversation.pipeline.crops:
            from phi3v_ort.inputs.pipeline import make_pipeline

            pipeline = make_pipeline(conversation.model.builder, self._model.processor, request.crops)
            attached = [pipeline.prepare_image(image) for image in inputs]
        conversation.settings = request.generation  # the chat's /format does the same: og's options per turn
        events = conversation.ask(_check_question(question), attached)

        def counts() -> tuple[int, tuple[int, ...]]:
            turn = conversation.turns[-1]
            return (conversation.count_tokens(conversation.turns[:-1], turn),
                    tuple(conversation.pipeline.image_tokens(image) for image in turn.images))

        return AnswerStream(events, request.stops, request.generation.guidance, counts)

    def reset(self) -> None:
        """Forget every turn and free the KV cache (the system message stays)."""
        self.conversation.reset()

    def _close(self) -> None:
        if self._conversation is not None:
            self._conversation.reset()
            self._conversation = None


class Model:
    """A loaded Phi-3(.5)-vision package: ask, stream, chat and prepare on it. Get one with `phi3v_ort.load`.

    >>> with phi3v_ort.load("tests/fixtures/tiny-int4-cpu") as model:            # doctest: +SKIP
    ...     print(model.ask("Hi", max_new_tokens=8).text)
    """

    def __init__(self, loaded: LoadedModel, processor: str, crops: int):
        self._loaded: LoadedModel | None = loaded
        self.processor = processor
        self.crops = crops
        self._chats: weakref.WeakSet[Chat] = weakref.WeakSet()

    @property
    def engine(self) -> LoadedModel:
        """The engine's LoadedModel (og model, tokenizer, package facts), for what the API does not cover."""
        return self._check_open()

    @property
    def path(self) -> Path:
        """The package folder."""
        return self.engine.info.path

    @property
    def device(self) -> str:
        """"cuda" or "cpu"."""
        return self.engine.device

    def ask(self, question: str, images: ImageLike | Sequence[ImageLike] = (), *, system: str | None = None,
            allow_remote: bool = False, **settings: Unpack[Settings]) -> Answer:
        """Answer a question about zero or more images (a list, or one image: a path, a PIL image, bytes or an
        HxWx3 uint8 array; an http(s) URL with allow_remote=True). Settings: see `phi3v_ort.Settings`.

        >>> model.ask("Introduce this stock to me.", images=["examples/chart.png"]).text   # doctest: +SKIP
        >>> model.ask("Title and author?", images=[cover], json_schema=schema).parsed   # doctest: +SKIP
        """
        return self.stream(question, images, system=system, allow_remote=allow_remote, **settings).answer

    def stream(self, question: str, images: ImageLike | Sequence[ImageLike] = (), *, system: str | None = None,
               allow_remote: bool = False, **settings: Unpack[Settings]) -> AnswerStream:
        """As `ask`, yielding the answer's text pieces as they are generated (`.answer` has the rest after).

        >>> for piece in model.stream("Describe the image.", images=[pil_image]):   # doctest: +SKIP
        ...     print(piece, end="", flush=True)
        """
        from phi3v_ort.engine import generation

        loaded = self._check_open()
        request = _request(dict(settings))
        inputs = _images(images, allow_remote)
        prepared = generation.prepare(loaded, _check_question(question), inputs, system, self.processor,
                                      self.crops if request.crops is None else request.crops)
        events = generation.stream_prepared(loaded, prepared, request.generation)  # as `phi3v-ort run`
        return AnswerStream(events, request.stops, request.generation.guidance,
                            lambda: (prepared.prompt_tokens, prepared.image_tokens))

    def chat(self, system: str | None = None, reserve_tokens: int = CONVERSATION_RESERVE_TOKENS) -> Chat:
        """A conversation that keeps the KV cache between turns (`reserve_tokens`: cache room kept for
        follow-up turns beyond the first answer, as `phi3v-ort chat --reserve-tokens`).

        >>> chat = model.chat(system="Answer briefly.")   # doctest: +SKIP
        """
        from phi3v_ort.engine.conversation import Conversation

        if isinstance(reserve_tokens, bool) or not isinstance(reserve_tokens, int) or reserve_tokens < 0:
            raise SettingError(f"reserve_tokens must be an integer of at least 0, got {reserve_tokens!r}")
        conversation = Conversation(self._check_open(), system=system, reserve_tokens=reserve_tokens,
                                    processor=self.processor, crops=self.crops)
        chat = Chat(self, conversation)
        self._chats.add(chat)
        return chat

    def prepare(self, question: str, images: ImageLike | Sequence[ImageLike] = (), *, system: str | None = None,
                crops: int | None = None, allow_remote: bool = False) -> dict:
        """What the model would get, without generating: the dict `phi3v-ort prepare --json` prints (prompt,
        input_ids, image_sizes, num_image_tokens, prompt_tokens).

        >>> model.prepare("Describe.", images=["examples/chart.png"])["num_image_tokens"]   # doctest: +SKIP
        """
        from phi3v_ort.engine import generation
        from phi3v_ort.engine.preview import preview_dict

        loaded = self._check_open()
        if crops is not None:
            _request({"crops": crops})
        inputs = generation.prepare(loaded, _check_question(question), _images(images, allow_remote), system,
                                    self.processor, self.crops if crops is None else crops)
        return preview_dict(inputs)

    def close(self) -> None:
        """Free the model (and the KV caches of its chats). Later calls on it are an error."""
        for chat in list(self._chats):
            chat._close()
        self._loaded = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._loaded is None:
            return "Model(closed)"
        return f"Model({str(self._loaded.info.path)!r}, device={self._loaded.device!r})"

    def _check_open(self) -> LoadedModel:
        if self._loaded is None:
            raise Phi3vError("the model is closed: load it again with phi3v_ort.load()")
        return self._loaded


def load(model: str | os.PathLike[str] = DEFAULT_MODEL, device: str = "auto", threads: int | None = None,
         crops: int = 16, processor: str = "own") -> Model:
    """Load a Phi-3(.5)-vision ONNX package once, to ask it many questions.

    model: a catalog name (phi-3-vision, phi-3.5-vision, optionally :gpu-int4 / :cpu-int4), found on disk or
        fetched from the Hugging Face hub on first use as `phi3v-ort run` does, or a package folder.
    device: "auto" (CUDA only when an NVIDIA GPU is really there), "cuda" or "cpu".
    threads: intra-op threads per model session on the CPU (default: the CPUs this process may use).
    crops: the crop budget per image, 1-16 (fewer: fewer image tokens, faster, less detail); per question too.
    processor: "own" (the runtime's pipeline, the reference processor's behaviour) or "og" (og's, to compare).

    >>> import phi3v_ort
    >>> model = phi3v_ort.load("tests/fixtures/tiny-int4-cpu", device="cpu")
    >>> model.ask("Describe the image.", images=["examples/chart.png"], max_new_tokens=8).finish_reason
    'length'
    >>> model.close()
    """
    from phi3v_ort.engine.kv_cache import KVCachePolicy
    from phi3v_ort.engine.model import load_model
    from phi3v_ort.inputs.pipeline import make_pipeline
    from phi3v_ort.package.fetch import resolve_model_dir

    for name, value in (("threads", threads), ("crops", crops)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise SettingError(f"{name} must be an integer, got {value!r}")
    if isinstance(model, os.PathLike):
        folder = resolve_model_dir(None, os.fspath(model), device)
    elif isinstance(model, str) and model:
        folder = resolve_model_dir(model, None, device)  # may fetch, with the hub client's own progress
    else:
        raise Phi3vError(f"model must be a catalog name or a package folder, got {model!r}")
    loaded = load_model(folder, device=device, policy=KVCachePolicy(), threads=threads)
    make_pipeline(loaded.builder, processor, crops)  # refuses a bad processor or crop budget, in one sentence
    return Model(loaded, processor, crops)
