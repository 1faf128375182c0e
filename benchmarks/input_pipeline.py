#!/usr/bin/env python3
"""The runtime's own input pipeline against og's processor: preparation per image, time to first token by crop
budget, and how much preparation keeps running in a thread while og generates.

    python benchmarks/input_pipeline.py --model-dir models/small-int4-cpu \
        --out benchmarks/results/input-pipeline-cpu-small --reps 7

Writes OUT.json (environment, settings, every sample) and OUT.md (the tables). Every comparison runs its sides
interleaved in one process after one warm-up round and reports medians and p90 (nearest rank): the machines are
noisy and may be shared, so read the ratios measured side by side rather than absolute numbers across runs.

1. Preparation per image, from bytes in memory to model-ready arrays. own: images.decode (Pillow, RGB) +
   pixels.prepare_image + InputBuilder.build for one image (pixel_values padded to the model's crop slots);
   og: og.Images.open_bytes + og's processor on the same prompt text (its NamedTensors are what set_inputs takes).
2. Time to first token with one 640x400 chart: own at crop budgets 1, 4, 8, 16 and og's processor (always 16),
   through generation.stream with max_new_tokens=2; the wall clock runs from the image bytes (Pillow decode
   included, as the CLI does it for both processors) to the first token event.
3. Overlap: a background thread prepares a 1920x1080 JPEG (own pipeline) in a loop; its completions per second
   (a) alone, (b) while the main thread decodes a text prompt with og, (c) while the main thread runs og's
   processor + image prefill. A pure-Python counting thread is measured the same way as a GIL probe, also
   per og call (processor, set_inputs, generate_next_token), and own preparation is timed while such a thread
   spins (the GIL hand-off cost of many short C calls).
Also: where the own pipeline's time goes per stage (decode, HD resize, global view, tiles, build).
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from phi3v_ort.package import contract  # noqa: E402
from phi3v_ort.bench.common import chart_image, environment, image_input, summarize, write_result  # noqa: E402
from phi3v_ort.engine.generation import Finished, TokenEvent, stream  # noqa: E402
from phi3v_ort.inputs.images import decode  # noqa: E402
from phi3v_ort.engine.model import load_model  # noqa: E402
from phi3v_ort.inputs.pixels import prepare_image  # noqa: E402
from phi3v_ort.inputs.prompt import build_prompt, render  # noqa: E402
from phi3v_ort.engine.settings import GenerationSettings  # noqa: E402

QUESTION = "Could you please introduce this stock to me?"
TEXT_QUESTION = "Write a long story about a lighthouse keeper and the sea."
# targets for own preparation (median), and og's times when they were set
TARGETS_MS = {"640x400 PNG": 20.0, "1920x1080 JPEG": 60.0, "4032x3024 JPEG": 150.0}
OG_THEN_MS = {"640x400 PNG": 52.0, "1920x1080 JPEG": 175.0, "4032x3024 JPEG": 389.0}


# -- images: deterministic, with structure (gradients, shapes, noise) ---------------------------------------------

def structured_rgb(width: int, height: int, seed: int) -> Image.Image:
    """Gradients, a diagonal pattern, a few blocks and noise: compresses like a photo, not like a flat field."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 127.5 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)
    arr = np.stack([r, g, b], axis=-1) + rng.normal(0, 10, (height, width, 3)).astype(np.float32)
    for _ in range(12):  # blocks with edges, like objects in a scene
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        arr[y0: y0 + height // 6, x0: x0 + width // 8] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def encoded(img: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def bench_images() -> dict[str, bytes]:
    return {
        "640x400 PNG": encoded(structured_rgb(640, 400, 1), "PNG"),
        "1920x1080 JPEG": encoded(structured_rgb(1920, 1080, 2), "JPEG"),
        "4032x3024 JPEG": encoded(structured_rgb(4032, 3024, 3), "JPEG"),
        "4032x3024 PNG": encoded(structured_rgb(4032, 3024, 3), "PNG"),
    }


# -- 1. preparation per image ---------------------------------------------------------------------------------------

def own_prepare(builder, data: bytes, segments, num_crops: int = contract.MAX_CROPS) -> dict:
    t0 = time.perf_counter()
    img, _ = decode(data, "bench")
    t1 = time.perf_counter()
    prepared = prepare_image(img, num_crops)
    t2 = time.perf_counter()
    inputs = builder.build(segments, [prepared])
    t3 = time.perf_counter()
    return {"decode_s": t1 - t0, "prepare_s": t2 - t1, "build_s": t3 - t2, "total_s": t3 - t0,
            "image_tokens": inputs.image_tokens[0], "image_sizes": inputs.image_sizes.tolist()[0]}


def og_prepare(processor, data: bytes, prompt: str) -> dict:
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    images = og.Images.open_bytes(data)
    t1 = time.perf_counter()
    result = processor(prompt, images=images)
    t2 = time.perf_counter()
    ids = result["input_ids"].as_numpy()
    return {"open_bytes_s": t1 - t0, "processor_s": t2 - t1, "total_s": t2 - t0,
            "image_tokens": int((ids == -1).sum()), "image_sizes": result["image_sizes"].as_numpy().tolist()[0]}


def preparation(model, images: dict[str, bytes], reps: int) -> list[dict]:
    segments = build_prompt(QUESTION, 1)
    prompt = render(segments)
    samples = {name: {"own": [], "og": []} for name in images}
    for rep in range(reps + 1):  # round 0 is the warm-up
        for name, data in images.items():
            order = ("own", "og") if rep % 2 else ("og", "own")  # alternate who goes first
            for side in order:
                r = own_prepare(model.builder, data, segments) if side == "own" else og_prepare(model.processor,
                                                                                                 data, prompt)
                if rep:
                    samples[name][side].append(r)
    rows = []
    for name, data in images.items():
        own, og_ = samples[name]["own"], samples[name]["og"]
        row = {"image": name, "bytes": len(data),
               "own": {k: summarize([s[k] for s in own]) for k in ("decode_s", "prepare_s", "build_s", "total_s")},
               "og": {k: summarize([s[k] for s in og_]) for k in ("open_bytes_s", "processor_s", "total_s")},
               "image_tokens": {"own": own[0]["image_tokens"], "og": og_[0]["image_tokens"]},
               "image_sizes": {"own": own[0]["image_sizes"], "og": og_[0]["image_sizes"]},
               "target_ms": TARGETS_MS.get(name), "og_when_target_set_ms": OG_THEN_MS.get(name)}
        row["own_over_og"] = row["own"]["total_s"]["median"] / row["og"]["total_s"]["median"]
        if row["target_ms"] is not None:
            row["target_met"] = row["own"]["total_s"]["median"] * 1000 <= row["target_ms"]
        rows.append(row)
    return rows


def stages(model, images: dict[str, bytes], reps: int) -> list[dict]:
    """Where the own pipeline's time goes, per stage (pixels.py's own functions; tiles + LUT is the rest of
    prepare_image)."""
    from phi3v_ort.inputs import pixels

    segments = build_prompt(QUESTION, 1)
    rows = []
    for name in TARGETS_MS:
        data = images[name]
        s = {k: [] for k in ("decode_s", "hd_transform_s", "global_view_s", "prepare_image_s", "build_s")}
        for rep in range(reps + 1):
            t0 = time.perf_counter()
            img, _ = decode(data, "bench")
            t1 = time.perf_counter()
            arr = np.asarray(pixels.hd_transform(img, contract.MAX_CROPS))
            t2 = time.perf_counter()
            pixels.global_view(arr)
            t3 = time.perf_counter()
            prepared = prepare_image(img, contract.MAX_CROPS)
            t4 = time.perf_counter()
            model.builder.build(segments, [prepared])
            t5 = time.perf_counter()
            if rep:
                for k, v in zip(s, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                    s[k].append(v)
        row = {"image": name, **{k: summarize(v) for k, v in s.items()}}
        row["tiles_lut_s"] = (row["prepare_image_s"]["median"] - row["hd_transform_s"]["median"]
                              - row["global_view_s"]["median"])
        rows.append(row)
    return rows


# -- 2. time to first token by crop budget ---------------------------------------------------------------------------

def first_token(model, data: bytes, processor: str, crops: int) -> dict:
    settings = GenerationSettings(max_new_tokens=2)
    t0 = time.perf_counter()
    image = image_input(data, "chart.png")  # the Pillow decode the CLI does for either processor
    ttft = None
    finished = None
    for event in stream(model, QUESTION, [image], settings, processor=processor, crops=crops):
        if isinstance(event, TokenEvent) and ttft is None:
            ttft = time.perf_counter() - t0
        elif isinstance(event, Finished):
            finished = event
    s = finished.stats
    return {"ttft_wall_s": ttft, "preprocess_s": s.preprocess_s, "prefill_s": s.prefill_s,
            "prompt_tokens": s.prompt_tokens, "image_tokens": s.image_tokens[0]}


TTFT_CONFIGS = (("own", 1), ("own", 4), ("own", 8), ("own", 16), ("og", 16))


def time_to_first_token(model, reps: int) -> list[dict]:
    data = chart_image(640, 400)
    samples = {cfg: [] for cfg in TTFT_CONFIGS}
    for rep in range(reps + 1):
        configs = TTFT_CONFIGS if rep % 2 else tuple(reversed(TTFT_CONFIGS))
        for cfg in configs:
            print(f"  ttft round {rep} {cfg[0]} crops={cfg[1]}", file=sys.stderr, flush=True)
            r = first_token(model, data, *cfg)
            if rep:
                samples[cfg].append(r)
    rows = []
    for (processor, crops), runs in samples.items():
        rows.append({"processor": processor, "crops": crops, "prompt_tokens": runs[0]["prompt_tokens"],
                     "image_tokens": runs[0]["image_tokens"],
                     **{k: summarize([r[k] for r in runs]) for k in ("ttft_wall_s", "preprocess_s", "prefill_s")}})
    return rows


# -- 3. overlap: preparation in a thread while og generates -----------------------------------------------------------

class _Loop:
    """A daemon thread running `_loop` until the `with` block ends (started 50 ms before the block's body)."""

    def __init__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        raise NotImplementedError

    def __enter__(self):
        self.thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


class Background(_Loop):
    """Runs `work` in a loop in a daemon thread and records when each call completed."""

    def __init__(self, work):
        super().__init__()
        self.work, self.done = work, []

    def _loop(self):
        while not self.stop.is_set():
            self.work()
            self.done.append(time.perf_counter())

    def rate(self, start: float, end: float) -> float:
        return sum(1 for t in self.done if start < t <= end) / (end - start)


class Counter(_Loop):
    """A pure-Python loop: it advances only while it holds the GIL (a probe of who holds it)."""

    def __init__(self):
        super().__init__()
        self.n = 0
        self.marks: list[tuple[float, int]] = []

    def _loop(self):
        n = 0
        while not self.stop.is_set():
            for _ in range(1000):
                n += 1
            self.n = n

    def rate(self, start_n: int, end_n: int, seconds: float) -> float:
        return (end_n - start_n) / seconds


def decode_for(model, seconds: float) -> tuple[float, float, int]:
    """Decode a text prompt with og for about `seconds` (after its short prefill): (start, end, tokens)."""
    settings = GenerationSettings(max_new_tokens=3000, ignore_eos=True)
    tokens, start = 0, None
    for event in stream(model, TEXT_QUESTION, [], settings):
        if isinstance(event, TokenEvent):
            if start is None:
                start = time.perf_counter()
            else:
                tokens += 1
            if time.perf_counter() - start >= seconds:
                break
    return start, time.perf_counter(), tokens


def image_prefill(model, data: bytes) -> tuple[float, float]:
    """og's processor + image prefill (one 640x400 chart, 16 crops) until the first token: (start, end)."""
    start = time.perf_counter()
    image = image_input(data, "chart.png")
    for event in stream(model, QUESTION, [image], GenerationSettings(max_new_tokens=1), processor="og"):
        if isinstance(event, TokenEvent):
            break
    return start, time.perf_counter()


def overlap(model, rounds: int, window_s: float) -> dict:
    jpeg = bench_images()["1920x1080 JPEG"]
    chart = chart_image(640, 400)
    segments = build_prompt(QUESTION, 1)

    def prep():
        own_prepare(model.builder, jpeg, segments)

    s = {k: [] for k in ("prep_alone", "prep_during_decode", "prep_during_prefill", "decode_tps_alone",
                         "decode_tps_with_prep", "prefill_s_with_prep", "counter_alone", "counter_during_decode",
                         "counter_during_prefill")}
    for rnd in range(rounds + 1):  # round 0 is the warm-up
        print(f"  overlap round {rnd}", file=sys.stderr, flush=True)
        keep = rnd > 0
        start, end, tokens = decode_for(model, window_s)  # generation alone
        if keep:
            s["decode_tps_alone"].append(tokens / (end - start))
        with Background(prep) as bg:
            start = time.perf_counter()
            time.sleep(window_s)
            end = time.perf_counter()
            if keep:
                s["prep_alone"].append(bg.rate(start, end))
        with Background(prep) as bg:
            start, end, tokens = decode_for(model, window_s)
            if keep:
                s["prep_during_decode"].append(bg.rate(start, end))
                s["decode_tps_with_prep"].append(tokens / (end - start))
        with Background(prep) as bg:
            start, end = image_prefill(model, chart)
            if keep:
                s["prep_during_prefill"].append(bg.rate(start, end))
                s["prefill_s_with_prep"].append(end - start)
        with Counter() as c:
            n0, t0 = c.n, time.perf_counter()
            time.sleep(window_s / 2)
            if keep:
                s["counter_alone"].append(c.rate(n0, c.n, time.perf_counter() - t0))
        with Counter() as c:
            n0, t0 = c.n, time.perf_counter()
            decode_for(model, window_s / 2)
            if keep:
                s["counter_during_decode"].append(c.rate(n0, c.n, time.perf_counter() - t0))
        with Counter() as c:
            n0 = c.n
            start, end = image_prefill(model, chart)
            n1 = c.n
            if keep:
                s["counter_during_prefill"].append(c.rate(n0, n1, end - start))
    out = {k: summarize(v) for k, v in s.items()}
    alone = out["prep_alone"]["median"]
    out["kept_during_decode"] = out["prep_during_decode"]["median"] / alone
    out["kept_during_prefill"] = out["prep_during_prefill"]["median"] / alone
    out["decode_kept_with_prep"] = out["decode_tps_with_prep"]["median"] / out["decode_tps_alone"]["median"]
    out["counter_kept_during_decode"] = out["counter_during_decode"]["median"] / out["counter_alone"]["median"]
    out["counter_kept_during_prefill"] = out["counter_during_prefill"]["median"] / out["counter_alone"]["median"]
    out["window_s"] = window_s
    return out


def gil_probe(model, rounds: int) -> dict:
    """How far a pure-Python thread advances during each og call of one image request (1.0 = as when the main
    thread sleeps): og's processor, Generator.set_inputs, the first and a later generate_next_token."""
    import onnxruntime_genai as og

    from phi3v_ort.engine.generation import prepare
    from phi3v_ort.engine.kv_cache import plan
    from phi3v_ort.engine.settings import search_options

    image = image_input(chart_image(640, 400), "chart.png")
    s = {k: [] for k in ("idle", "og_processor", "set_inputs", "first_token", "later_token")}
    seconds = {k: [] for k in s}
    for rnd in range(rounds + 1):
        with Counter() as c:
            def probe(name, fn):
                n0, t0 = c.n, time.perf_counter()
                out = fn()
                dt = time.perf_counter() - t0
                if rnd:
                    s[name].append((c.n - n0) / dt)
                    seconds[name].append(dt)
                return out

            probe("idle", lambda: time.sleep(1.0))
            inputs = probe("og_processor", lambda: prepare(model, QUESTION, [image], processor="og"))
            kv = plan(model.info, inputs.prompt_tokens, 4, model.policy)
            params = og.GeneratorParams(model.og_model)
            params.set_search_options(**search_options(GenerationSettings(max_new_tokens=4), kv.max_length,
                                                       kv.share_buffer))
            generator = og.Generator(model.og_model, params)
            named = inputs.to_og()
            probe("set_inputs", lambda g=generator: g.set_inputs(named))
            probe("first_token", generator.generate_next_token)
            probe("later_token", generator.generate_next_token)
            del generator
    idle = summarize(s["idle"])["median"]
    return {k: {"counter_rate": summarize(v), "kept": summarize(v)["median"] / idle,
                "call_s": summarize(seconds[k])} for k, v in s.items()}


def convoy(model, images: dict[str, bytes], reps: int) -> dict:
    """Own preparation of the 640x400 PNG alone vs while a pure-Python thread spins: every GIL hand-off between
    its many short C calls waits for the other thread's switch interval."""
    segments = build_prompt(QUESTION, 1)
    data = images["640x400 PNG"]
    s = {"alone": [], "with_python_thread": []}
    for rep in range(reps + 1):
        r = own_prepare(model.builder, data, segments)
        with Counter():
            r2 = own_prepare(model.builder, data, segments)
        if rep:
            s["alone"].append(r["total_s"])
            s["with_python_thread"].append(r2["total_s"])
    out = {k: summarize(v) for k, v in s.items()}
    out["slowdown"] = out["with_python_thread"]["median"] / out["alone"]["median"]
    out["switch_interval_s"] = sys.getswitchinterval()
    return out


# -- report ------------------------------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    env = result["environment"]
    ms = lambda x: f"{x * 1000:.1f}"  # noqa: E731
    med_p90 = lambda d: f"{ms(d['median'])} / {ms(d['p90'])}"  # noqa: E731
    reps = result["settings"]["reps"]
    lines = [f"# Input pipeline: own vs og's processor on {result['model']} ({env['cpu']}, {env['cores']} cores)", "",
             f"Command: `{result['command']}`", "",
             f"The machine has {env['cores']} cores and is shared with other work (other engineers' tests may run "
             "at the same time): read the side-by-side ratios, not the absolute times. Every comparison is "
             "interleaved in one process after one warm-up round. Versions: "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".", "",
             f"## 1. Preparation per image, bytes in memory -> model-ready arrays (median / p90 ms, {reps} reps)", "",
             "own = Pillow decode + pixels.prepare_image + InputBuilder.build (pixel_values padded to the model's "
             "17 crop slots); og = og.Images.open_bytes + og's processor. Crop budget 16 on both sides.", "",
             "| image | bytes | own decode | own prepare | own build | **own total** | **og total** | own/og "
             "| target | met | og when the target was set |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["preparation"]:
        o, g = r["own"], r["og"]
        target = f"<= {r['target_ms']:.0f} ms" if r["target_ms"] else "-"
        met = ("yes" if r["target_met"] else "**no**") if r["target_ms"] else "-"
        then = f"{r['og_when_target_set_ms']:.0f} ms" if r["og_when_target_set_ms"] else "-"
        lines.append(f"| {r['image']} | {r['bytes']:,} | {ms(o['decode_s']['median'])} | "
                     f"{ms(o['prepare_s']['median'])} | {ms(o['build_s']['median'])} | {med_p90(o['total_s'])} | "
                     f"{med_p90(g['total_s'])} | {r['own_over_og']:.2f} | {target} | {met} | {then} |")
    lines += ["", "Image tokens and image_sizes, own vs og: "
              + "; ".join(f"{r['image']}: {r['image_tokens']['own']} vs {r['image_tokens']['og']}, "
                          f"{r['image_sizes']['own']} vs {r['image_sizes']['og']}" for r in result["preparation"]), ""]
    lines += [f"## 2. Time to first token, one 640x400 chart (median / p90 ms, "
              f"{result['settings']['ttft_reps']} reps, interleaved)", "",
              "Wall clock from the image bytes (Pillow decode included) to the first token event; "
              "max_new_tokens=2, default threads.", "",
              "| processor | crop budget | image tokens | prompt tokens | preprocess | prefill | **time to first token** "
              "| vs og |", "|---|---|---|---|---|---|---|---|"]
    og_ttft = next(r for r in result["ttft"] if r["processor"] == "og")["ttft_wall_s"]["median"]
    for r in result["ttft"]:
        lines.append(f"| {r['processor']} | {r['crops']} | {r['image_tokens']} | {r['prompt_tokens']} | "
                     f"{ms(r['preprocess_s']['median'])} | {ms(r['prefill_s']['median'])} | "
                     f"{med_p90(r['ttft_wall_s'])} | {r['ttft_wall_s']['median'] / og_ttft:.2f} |")
    lines += ["", "Where the own pipeline's time goes (median ms; tiles + LUT = prepare_image - hd_transform - "
              "global_view):", "",
              "| image | decode | hd_transform (resize + pad) | global view (bicubic) | tiles + LUT | build |",
              "|---|---|---|---|---|---|"]
    for r in result["stages"]:
        lines.append(f"| {r['image']} | {ms(r['decode_s']['median'])} | {ms(r['hd_transform_s']['median'])} | "
                     f"{ms(r['global_view_s']['median'])} | {ms(r['tiles_lut_s'])} | {ms(r['build_s']['median'])} |")
    ov = result["overlap"]
    lines += ["", f"## 3. Preparation in a background thread while og generates ({result['settings']['overlap_rounds']} "
              f"rounds of {ov['window_s']:.0f} s windows, medians)", "",
              "Background work: own preparation of a 1920x1080 JPEG (decode + prepare_image + build), in a loop. "
              "A pure-Python counting thread is measured the same way: it advances only while it holds the GIL.", "",
              "| main thread | preparations/s | kept vs alone | pure-Python counter (M loops/s) | kept vs alone |",
              "|---|---|---|---|---|",
              f"| idle (sleep) | {ov['prep_alone']['median']:.2f} | 1.00 | {ov['counter_alone']['median'] / 1e6:.1f} "
              "| 1.00 |",
              f"| og decoding a text prompt | {ov['prep_during_decode']['median']:.2f} | "
              f"{ov['kept_during_decode']:.2f} | {ov['counter_during_decode']['median'] / 1e6:.1f} | "
              f"{ov['counter_kept_during_decode']:.2f} |",
              f"| og processor + image prefill (16 crops) | {ov['prep_during_prefill']['median']:.2f} | "
              f"{ov['kept_during_prefill']:.2f} | {ov['counter_during_prefill']['median'] / 1e6:.1f} | "
              f"{ov['counter_kept_during_prefill']:.2f} |", "",
              f"The other side: og decoded {ov['decode_tps_alone']['median']:.1f} tokens/s alone and "
              f"{ov['decode_tps_with_prep']['median']:.1f} tokens/s with the preparation thread running "
              f"({ov['decode_kept_with_prep']:.2f} kept); processor + image prefill took "
              f"{ov['prefill_s_with_prep']['median']:.1f} s with the thread running (og at 16 crops alone, table 2: "
              f"{og_ttft:.1f} s).", ""]
    gp = result["gil_probe"]
    lines += ["Which og call holds the GIL (pure-Python counter progress during the call, 1.00 = main thread idle; "
              f"median of {result['settings']['overlap_rounds']}):", "",
              "| og call | call time | counter kept |", "|---|---|---|"]
    for k, label in (("og_processor", "og processor (via generation.prepare, og)"),
                     ("set_inputs", "Generator.set_inputs (vision + embedding + decoder prefill)"),
                     ("first_token", "first generate_next_token"), ("later_token", "a later generate_next_token")):
        lines.append(f"| {label} | {ms(gp[k]['call_s']['median'])} ms | {gp[k]['kept']:.2f} |")
    cv = result["convoy"]
    lines += ["", f"The other way round: own preparation of the 640x400 PNG takes {ms(cv['alone']['median'])} ms alone "
              f"and {ms(cv['with_python_thread']['median'])} ms while a pure-Python thread spins "
              f"({cv['slowdown']:.1f}x; switch interval {cv['switch_interval_s'] * 1000:.0f} ms): each of its many "
              "short C calls has to win the GIL back.", ""]
    if result.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in result["notes"]], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True, help="Result path without extension (.json and .md are written).")
    parser.add_argument("--reps", type=int, default=7, help="Repetitions of the preparation comparison.")
    parser.add_argument("--ttft-reps", type=int, default=3)
    parser.add_argument("--overlap-rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=5.0, help="Seconds per overlap window.")
    args = parser.parse_args()

    model = load_model(args.model_dir, device="cpu")
    result = {
        "benchmark": "input_pipeline",
        "command": " ".join(["python", *sys.argv]),
        "model": str(Path(args.model_dir).name),
        "settings": {"reps": args.reps, "ttft_reps": args.ttft_reps, "overlap_rounds": args.overlap_rounds,
                     "warmup": 1, "window_s": args.window, "device": model.device, "threads": model.threads,
                     "crops": contract.MAX_CROPS, "question": QUESTION, "text_question": TEXT_QUESTION},
        "environment": environment(),
    }
    images = bench_images()
    print("preparation per image ...", file=sys.stderr, flush=True)
    result["preparation"] = preparation(model, images, args.reps)
    print("time to first token by crop budget ...", file=sys.stderr, flush=True)
    result["ttft"] = time_to_first_token(model, args.ttft_reps)
    print("stages ...", file=sys.stderr, flush=True)
    result["stages"] = stages(model, images, args.reps)
    print("overlap ...", file=sys.stderr, flush=True)
    result["overlap"] = overlap(model, args.overlap_rounds, args.window)
    print("GIL probe ...", file=sys.stderr, flush=True)
    result["gil_probe"] = gil_probe(model, args.overlap_rounds)
    result["convoy"] = convoy(model, images, args.reps)
    write_result(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
