"""Benchmark scenarios: the reference notebook's three tasks, a text-only prompt, a crop sweep, and the two
workload scenarios (conversation turn 2, batch throughput).

Images are generated (deterministic PNG, lossless, so both engines see the same pixels): a chart, a book cover,
photo-like pictures. og 0.18's processor always uses up to 16 crops, so the crop count follows the aspect
ratio alone (8..16 crops for real images); `vision-sweep` feeds the vision models directly with 1..16 crops.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "generate", "vision-sweep", "turn2" or "batch"
    question: str = ""
    images: tuple[tuple[str, int, int], ...] = ()  # (picture kind, width, height)
    note: str = ""


def render(kind: str, width: int, height: int, seed: int = 0) -> bytes:
    from phi3v_ort.bench.common import chart_image, cover_image, photo_image  # numpy, Pillow: not needed to list the scenarios

    if kind == "chart":
        return chart_image(width, height, seed)
    if kind == "cover":
        return cover_image(width, height, seed + 1)
    return photo_image(width, height, seed + 2)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("chart", "generate", "Could you please introduce this stock to me?", (("chart", 640, 400),),
             "notebook task 1: one chart (12 crops, 1921 image tokens)"),
    Scenario("cover", "generate", "Help me get the title and author information of this book?",
             (("cover", 600, 900),), "notebook task 2: one book cover (12 crops, 1921 image tokens)"),
    Scenario("compare", "generate", "What is difference in this two images?",
             (("photo", 800, 600), ("photo", 800, 600)), "notebook task 3: two photos (2 x 1921 image tokens)"),
    Scenario("text", "generate", "Write a short story about a lighthouse keeper.", (), "text only"),
    Scenario("crops-8", "generate", "Describe the image.", (("photo", 3192, 400),), "a panorama: 8 crops"),
    Scenario("crops-16", "generate", "Describe the image.", (("photo", 1000, 1000),), "a square: 16 crops"),
    Scenario("vision-sweep", "vision-sweep", note="vision model alone, 1..16 crops (one image)"),
    Scenario("turn2", "turn2", "Could you please introduce this stock to me?", (("chart", 640, 400),),
             "conversation: turn-2 time to first token, kept generator vs re-prefill of the transcript"),
    Scenario("batch", "batch", "Describe the image.",
             tuple(("photo", 400 + 97 * k, 300 + 61 * k) for k in range(8)),
             "8 images: items/s with the preparation pool vs strictly sequential"),
)}

DEFAULT_SCENARIOS = ("chart", "cover", "compare", "text", "crops-8", "crops-16", "vision-sweep", "turn2", "batch")
# the crop grids of the vision sweep: (rows, cols) with rows * cols = crops
SWEEP_GRIDS = ((1, 1), (1, 2), (2, 2), (2, 3), (3, 3), (3, 4), (4, 4))
