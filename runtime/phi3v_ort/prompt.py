"""Prompt building, in one place: the reference notebook's chat template, one <|image_k|> tag per image."""

from __future__ import annotations

import re

from .errors import Phi3vError

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")


def build_prompt(question: str, num_images: int, system: str | None = None) -> str:
    """`<|user|>\\n<|image_1|>\\n...{question}<|end|>\\n<|assistant|>\\n`, with an optional system turn first.

    If the question already places image tags itself, they are kept where they are and must name exactly the
    images given (<|image_1|> .. <|image_N|>, each once).
    """
    return system_turn(system) + user_turn(question, first_image=1, num_images=num_images)


def system_turn(system: str | None) -> str:
    return f"<|system|>\n{system}<|end|>\n" if system else ""


def user_turn(question: str, first_image: int, num_images: int) -> str:
    """One user turn ending with the assistant's header; its images are numbered from `first_image` (images are
    numbered across a whole conversation)."""
    numbers = list(range(first_image, first_image + num_images))
    tags = [int(n) for n in IMAGE_TAG.findall(question)]
    if tags:
        check_image_tags(tags, numbers)
        user = question
    else:
        user = "".join(f"<|image_{k}|>\n" for k in numbers) + question
    return f"<|user|>\n{user}<|end|>\n<|assistant|>\n"


def check_image_tags(tags: list[int], numbers: list[int]) -> None:
    """Tags in the user's text must name exactly the images given with it, each once."""
    unknown = [t for t in tags if t not in numbers]
    if unknown and not numbers:
        raise Phi3vError(f"the question contains the image tag <|image_{unknown[0]}|> but no image was given")
    if unknown:
        raise Phi3vError(f"unknown image tag <|image_{unknown[0]}|>: with {len(numbers)} image(s) the tags are "
                         f"<|image_{numbers[0]}|> to <|image_{numbers[-1]}|>")
    repeated = sorted({t for t in tags if tags.count(t) > 1})
    if repeated:
        raise Phi3vError(f"the image tag <|image_{repeated[0]}|> appears more than once in the question")
    if len(tags) != len(numbers):
        missing = [n for n in numbers if n not in tags]
        raise Phi3vError(f"{len(numbers)} images were given but the question tags only {len(tags)} "
                         f"(add <|image_{missing[0]}|> or drop that image)")
