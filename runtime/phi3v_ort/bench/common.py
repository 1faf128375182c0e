"""Benchmark building blocks: scenario images, a timed bare og loop, summaries, and the run's environment.

Every benchmark in benchmarks/ uses these, so both sides of a comparison are timed at the same boundaries
(see generation.py) and every result file records the machine, the versions and the settings.
"""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from phi3v_ort.inputs.images import ImageInput, load_image


def summarize(samples: list[float]) -> dict:
    """Median and p90 (nearest rank) of repeated runs, with the samples themselves."""
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(np.ceil(0.9 * len(ordered))) - 1)] if ordered else float("nan")
    return {"median": statistics.median(ordered) if ordered else float("nan"), "p90": p90, "n": len(ordered),
            "samples": samples}


def environment() -> dict:
    """Machine and versions, written next to every result."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    versions = {}
    for dist in ("phi3v-ort", "onnxruntime-genai-cuda", "onnxruntime-gpu", "numpy", "pillow", "torch",
                 "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    from phi3v_ort.package.device import gpu_count

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib, "gpus": gpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "versions": versions,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def rss_bytes() -> int:
    """Current resident set size of this process (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


# -- scenario images: deterministic, PNG (lossless, so both engines see the same pixels) -------------------------

def chart_image(width: int = 640, height: int = 400, seed: int = 0) -> bytes:
    """A line chart: axes, a price line, a title."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.line([(40, height - 40), (40, 20)], fill="black", width=2)
    d.line([(40, height - 40), (width - 20, height - 40)], fill="black", width=2)
    prices = np.cumsum(rng.normal(0, 1, 60)) * (height / 20) + height / 2
    xs = np.linspace(40, width - 20, len(prices))
    d.line(list(zip(xs.tolist(), np.clip(prices, 20, height - 40).tolist())), fill=(30, 90, 200), width=3)
    d.text((60, 24), "STOCK  1Y", fill="black")
    return _png(img)


def cover_image(width: int = 600, height: int = 900, seed: int = 1) -> bytes:
    """A book cover: a coloured field, a title block and an author line."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(20, 200, 3)))
    d = ImageDraw.Draw(img)
    d.rectangle([40, 80, width - 40, 300], fill=(240, 230, 200))
    d.text((60, 150), "THE LIGHTHOUSE", fill="black")
    d.text((60, height - 120), "by A. N. Author", fill="white")
    d.ellipse([width // 3, height // 2 - 80, 2 * width // 3, height // 2 + 80], fill=(250, 250, 250))
    return _png(img)


def photo_image(width: int = 800, height: int = 600, seed: int = 2) -> bytes:
    """A photo-like image: smooth gradients plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return _png(Image.fromarray(arr, "RGB"))


def write_result(out: str | Path, result: dict, markdown_text: str) -> None:
    """A benchmark's result as OUT.json (every sample, settings, versions) and OUT.md, and the table on stdout."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown_text)
    print(markdown_text)


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def image_input(data: bytes, name: str) -> ImageInput:
    """An ImageInput from in-memory bytes, through the same loader the CLI uses."""
    return replace(load_image("-", stdin=io.BytesIO(data)), source=name)


# -- the bare og loop: the baseline the runtime must match -------------------------------------------------------

@dataclass(frozen=True)
class BareTiming:
    token_ids: list[int]
    preprocess_s: float
    prefill_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        return (len(self.token_ids) - 1) / self.decode_s if self.decode_s > 0 else 0.0


def bare_og_generate(og_model, tokenizer, processor, prompt: str, images: list[bytes], max_new_tokens: int,
                     share_buffer: bool = True, ignore_eos: bool = True) -> BareTiming:
    """onnxruntime-genai's example loop (processor, params, generator, TokenizerStream) with the same clocks as
    generation.stream()."""
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    inputs = processor(prompt, images=og.Images.open_bytes(*images) if images else None)
    prompt_len = inputs["input_ids"].as_numpy().shape[-1]
    t_pre = time.perf_counter()
    params = og.GeneratorParams(og_model)
    options = {"max_length": prompt_len + max_new_tokens, "past_present_share_buffer": share_buffer,
               "do_sample": False, "top_k": 1}
    if ignore_eos:
        options["min_length"] = prompt_len + max_new_tokens
    params.set_search_options(**options)
    generator = og.Generator(og_model, params)
    stream = tokenizer.create_stream()
    t_prefill = time.perf_counter()
    generator.set_inputs(inputs)
    tokens: list[int] = []
    t_first = t_last = t_prefill
    while not generator.is_done():
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        t_last = time.perf_counter()
        if not tokens:
            t_first = t_last
        tokens.append(token)
        stream.decode(token)
    del generator
    return BareTiming(token_ids=tokens, preprocess_s=t_pre - t0, prefill_s=t_first - t_prefill,
                      decode_s=t_last - t_first)
