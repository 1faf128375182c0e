"""Prompts, in one place: the reference notebook's chat template as a list of segments, never one string.

The template's markers (`<|user|>`, `<|end|>`, ...) are `Control` segments and image placeholders are `Image`
segments; everything a person wrote (question, system message, earlier answers) is `Text`, which the tokenizer
(tokens.py) always reads as plain text. So a question, a caption or an OCR'd page that contains `<|end|>` or
`<|endoftext|>` can never end a turn or inject one: it becomes the ordinary pieces of those characters.

Image tags are the runtime's: it puts one `<|image_k|>` per image before the question. A question may place its
images' tags itself (`Compare <|image_1|> with <|image_2|>`) when every tag names an image given with it, each
once, in order; any other `<|image_k|>` (an unknown k, a repeat, one in a system message or an answer) is a clear
error, never a native index error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from phi3v_ort.errors import Phi3vError

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")


def check_unicode(text: str, what: str = "the text") -> None:
    """Refuse a lone surrogate (U+D800-U+DFFF alone): what Python makes of a byte that is not UTF-8 in a command
    line (`caf\\xe9` -> `caf\\udce9`) or what JSON's `\\ud800` escape gives (half of an emoji, left by
    JavaScript's slice). It is not text: no tokenizer, file or socket takes it as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Phi3vError(f"{what} is not valid Unicode: a lone surrogate ({text[exc.start]!r}) at character "
                         f"{exc.start} (a byte that is not UTF-8, or half of an emoji)") from None


@dataclass(frozen=True)
class Text:
    """Text someone wrote: always tokenized as plain text."""

    text: str

    def __post_init__(self) -> None:
        check_unicode(self.text)


@dataclass(frozen=True)
class Control:
    """A template marker such as `<|user|>`: the tokenizer's added token of that name."""

    token: str


@dataclass(frozen=True)
class Image:
    """Image `number`'s run of placeholder ids (-number), as long as its token count."""

    number: int


@dataclass(frozen=True)
class Tokens:
    """Ids the model generated (an earlier answer), kept as they were so a re-prefill equals a continuation."""

    ids: tuple[int, ...]


Segment = Text | Control | Image | Tokens
USER, ASSISTANT, SYSTEM, END = Control("<|user|>"), Control("<|assistant|>"), Control("<|system|>"), Control("<|end|>")
NEWLINE = Text("\n")


def build_prompt(question: str, num_images: int, system: str | None = None) -> list[Segment]:
    """`<|system|>\\n{system}<|end|>\\n<|user|>\\n<|image_1|>\\n...{question}<|end|>\\n<|assistant|>\\n`."""
    return system_turn(system) + user_turn(question, first_image=1, num_images=num_images)


def system_turn(system: str | None) -> list[Segment]:
    if not system:
        return []
    refuse_image_tags(system, "the system message")
    return [SYSTEM, NEWLINE, Text(system), END, NEWLINE]


def user_turn(question: str, first_image: int, num_images: int) -> list[Segment]:
    """One user turn ending with the assistant's header; its images are numbered from `first_image` (images are
    numbered across a whole conversation)."""
    numbers = list(range(first_image, first_image + num_images))
    tags = [int(n) for n in IMAGE_TAG.findall(question)]
    body: list[Segment]
    if tags:
        check_image_tags(tags, numbers)
        body = []
        for i, part in enumerate(IMAGE_TAG.split(question)):
            if i % 2:
                body.append(Image(int(part)))
            elif part:
                body.append(Text(part))
    else:
        body = [seg for k in numbers for seg in (Image(k), NEWLINE)] + ([Text(question)] if question else [])
    return [USER, NEWLINE, *body, END, NEWLINE, ASSISTANT, NEWLINE]


def answer_turn(answer: str | Sequence[int]) -> list[Segment]:
    """The assistant's answer after its header, then the end of the turn: text from a client (plain), or the ids
    this runtime generated."""
    if isinstance(answer, str):
        refuse_image_tags(answer, "an assistant message")
        body: list[Segment] = [Text(answer)] if answer else []
    else:
        body = [Tokens(tuple(int(t) for t in answer))] if len(answer) else []
    return [*body, END, NEWLINE]


@dataclass
class Turn:
    """One user turn and the answer to it: the one turn type of a parsed request (images as the client sent them),
    a worker's job and a conversation (images prepared for the model)."""

    question: str
    images: list  # ImageRefs in a parsed request; prepared images (PreparedImage / OgImage) once prepared
    answer: str = ""
    answer_ids: list[int] = field(default_factory=list)  # ids generated here; empty for an answer given as text


def transcript(system: str | None, turns: Sequence[Turn], new: Turn) -> list[Segment]:
    """The whole conversation as prompt segments: images numbered across turns, answers generated here as their
    own ids, answers given as text as plain text."""
    segments = system_turn(system)
    number = 1
    for t in turns:
        segments += user_turn(t.question, number, len(t.images))
        segments += answer_turn(t.answer_ids if t.answer_ids else t.answer)
        number += len(t.images)
    return segments + user_turn(new.question, number, len(new.images))


def new_turn_start(segments: Sequence[Segment], new: Turn, turns: Sequence[Turn]) -> int | None:
    """Where, in a transcript's segments, the newest turn's own part starts: the `<|end|>` that closes the last
    answer (the tokens a kept generator is continued with, conversation.py); None for a first turn."""
    if not turns:
        return None
    first_image = sum(len(t.images) for t in turns) + 1
    return len(segments) - len(user_turn(new.question, first_image, len(new.images))) - 2


def render(segments: Sequence[Segment], decode=None) -> str:
    """The prompt as text, the way the reference template writes it (for display, `prepare --json` and og's
    processor). `decode` turns kept answer ids back into text."""
    out = []
    for seg in segments:
        if isinstance(seg, Text):
            out.append(seg.text)
        elif isinstance(seg, Control):
            out.append(seg.token)
        elif isinstance(seg, Image):
            out.append(f"<|image_{seg.number}|>")
        else:
            out.append(decode(list(seg.ids)) if decode else "")
    return "".join(out)


def refuse_image_tags(text: str, where: str) -> None:
    match = IMAGE_TAG.search(text)
    if match:
        raise Phi3vError(f"{where} contains the image tag {match.group(0)}: images can be placed only in a "
                         "question, by the images given with it")


def check_image_tags(tags: list[int], numbers: list[int]) -> None:
    """Tags in the user's text must name exactly the images given with it, each once, in order."""
    unknown = [t for t in tags if t not in numbers]
    if unknown and not numbers:
        raise Phi3vError(f"the question contains the image tag <|image_{unknown[0]}|> but no image was given")
    if unknown:
        allowed = (f"1 image the only tag is <|image_{numbers[0]}|>" if len(numbers) == 1 else
                   f"{len(numbers)} images the tags are <|image_{numbers[0]}|> to <|image_{numbers[-1]}|>")
        raise Phi3vError(f"unknown image tag <|image_{unknown[0]}|>: with {allowed}")
    repeated = sorted({t for t in tags if tags.count(t) > 1})
    if repeated:
        raise Phi3vError(f"the image tag <|image_{repeated[0]}|> appears more than once in the question")
    if len(tags) != len(numbers):
        missing = [n for n in numbers if n not in tags]
        raise Phi3vError(f"{len(numbers)} images were given but the question tags only {len(tags)} "
                         f"(add <|image_{missing[0]}|> or drop that image)")
    if tags != sorted(tags):
        raise Phi3vError("the question's image tags must come in order (<|image_1|> before <|image_2|>): the "
                         "model reads image features in that order")
