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
    tags = [int(n) for n in IMAGE_TAG.findall(question)]
    if tags:
        check_image_tags(tags, num_images)
        user = question
    else:
        user = "".join(f"<|image_{k}|>\n" for k in range(1, num_images + 1)) + question
    head = f"<|system|>\n{system}<|end|>\n" if system else ""
    return f"{head}<|user|>\n{user}<|end|>\n<|assistant|>\n"


def check_image_tags(tags: list[int], num_images: int) -> None:
    """Tags in the user's text must be <|image_1|>..<|image_N|>, each once, for the N images given."""
    unknown = sorted({t for t in tags if t < 1 or t > max(num_images, 0)})
    if unknown and num_images == 0:
        raise Phi3vError(f"the question contains the image tag <|image_{unknown[0]}|> but no image was given")
    if unknown:
        raise Phi3vError(f"unknown image tag <|image_{unknown[0]}|>: with {num_images} image(s) the tags are "
                         f"<|image_1|> to <|image_{num_images}|>")
    repeated = sorted({t for t in tags if tags.count(t) > 1})
    if repeated:
        raise Phi3vError(f"the image tag <|image_{repeated[0]}|> appears more than once in the question")
    if len(tags) != num_images:
        missing = sorted(set(range(1, num_images + 1)) - set(tags))
        raise Phi3vError(f"{num_images} images were given but the question tags only {len(tags)} "
                         f"(add <|image_{missing[0]}|> or drop that image)")
