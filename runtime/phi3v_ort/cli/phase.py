"""A one-line phase indicator on stderr for `run` and `chat` ("preparing image", "reading image (1,921 tokens)"),
only when stderr is a terminal; nothing at all otherwise (pipes, files, tests).

Why a static line and not a spinner: onnxruntime-genai 0.18 holds the Python GIL for the whole prefill (the long
wait: seconds to minutes on a CPU), so a spinner thread could not draw a single frame during it. The line is
written before each step and erased when the first token of the answer arrives, before the answer is printed.
"""

from __future__ import annotations

import sys
from typing import TextIO

CLEAR = "\r\x1b[2K"  # back to the start of the line, erase it


class Phase:
    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            try:
                enabled = self.stream.isatty()
            except (AttributeError, ValueError):
                enabled = False
        self.enabled = enabled
        self.shown = False

    def show(self, text: str) -> None:
        if self.enabled:
            self.stream.write(f"{CLEAR}{text} ...")
            self.stream.flush()
            self.shown = True

    def clear(self) -> None:
        if self.enabled and self.shown:
            self.stream.write(CLEAR)
            self.stream.flush()
            self.shown = False


def reading(image_tokens: list[int] | tuple[int, ...], prompt_tokens: int | None = None) -> str:
    """'reading image (1,921 tokens)', 'reading 2 images (4,298 tokens)', or 'reading the prompt (13 tokens)'."""
    if image_tokens:
        what = "image" if len(image_tokens) == 1 else f"{len(image_tokens)} images"
        return f"reading {what} ({sum(image_tokens):,} tokens)"
    return f"reading the prompt ({prompt_tokens:,} tokens)" if prompt_tokens else "reading the question"


def preparing(n_images: int) -> str:
    return {0: "preparing the prompt", 1: "preparing image"}.get(n_images, f"preparing {n_images} images")
