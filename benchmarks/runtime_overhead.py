#!/usr/bin/env python3
"""The runtime against a bare og loop, the shared KV buffer on vs off, and preprocessing time per image size.

    python benchmarks/runtime_overhead.py --model-dir models/small-int4-cpu --out benchmarks/results/runtime-cpu-small

Writes OUT.json (environment, settings, every sample) and OUT.md (the tables). Each comparison runs its two sides
interleaved in one process after a warm-up, and reports medians and p90 of the repetitions: these machines are
noisy, so read ratios measured side by side, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from PIL import Image  # noqa: E402

from phi3v_ort.bench.common import (  # noqa: E402
    bare_og_generate, chart_image, environment, image_input, photo_image, summarize, write_result)
from phi3v_ort.engine.generation import Finished, prepare, stream  # noqa: E402
from phi3v_ort.inputs.images import load_image  # noqa: E402
from phi3v_ort.engine.kv_cache import KVCachePolicy  # noqa: E402
from phi3v_ort.engine.model import load_model  # noqa: E402
from phi3v_ort.inputs.prompt import build_prompt, render  # noqa: E402
from phi3v_ort.engine.settings import GenerationSettings  # noqa: E402

QUESTION = "Could you please introduce this stock to me?"


def run_runtime(model, images, max_new_tokens, processor="own"):
    settings = GenerationSettings(max_new_tokens=max_new_tokens, ignore_eos=True)
    for event in stream(model, QUESTION, images, settings, processor=processor):
        if isinstance(event, Finished):
            return event


def runtime_vs_bare(model, reps: int, max_new_tokens: int) -> dict:
    data = chart_image()
    images = [image_input(data, "chart.png")]
    prompt = render(build_prompt(QUESTION, 1))  # the bare loop is og's example: og's processor on the text
    samples = {k: [] for k in ("bare_ttft_s", "runtime_ttft_s", "bare_prefill_s", "runtime_prefill_s",
                               "bare_decode_tps", "runtime_decode_tps")}
    tokens_equal = True
    for rep in range(reps + 1):  # the first round is the warm-up
        bare = bare_og_generate(model.og_model, model.tokenizer, model.processor, prompt, [data], max_new_tokens)
        done = run_runtime(model, images, max_new_tokens, processor="og")  # the same inputs as the bare loop
        tokens_equal &= list(done.token_ids) == bare.token_ids
        if rep == 0:
            continue
        s = done.stats
        samples["bare_ttft_s"].append(bare.preprocess_s + bare.prefill_s)
        samples["runtime_ttft_s"].append(s.time_to_first_token_s - sum(i.load_s for i in images))  # same boundary
        samples["bare_prefill_s"].append(bare.prefill_s)
        samples["runtime_prefill_s"].append(s.prefill_s)
        samples["bare_decode_tps"].append(bare.decode_tokens_per_s)
        samples["runtime_decode_tps"].append(s.decode_tokens_per_s)
    out = {k: summarize(v) for k, v in samples.items()}
    out["ratio_decode_tps"] = out["runtime_decode_tps"]["median"] / out["bare_decode_tps"]["median"]
    out["ratio_ttft"] = out["runtime_ttft_s"]["median"] / out["bare_ttft_s"]["median"]
    out["tokens_equal"] = tokens_equal
    out["max_new_tokens"] = max_new_tokens
    return out


def share_buffer_on_off(model, reps: int, max_new_tokens: int) -> dict:
    on = replace(model, policy=KVCachePolicy(share_buffer=True))
    off = replace(model, policy=KVCachePolicy(share_buffer=False))
    results = {}
    for scenario, images in (("text-only", []), ("one image", [image_input(chart_image(), "chart.png")])):
        samples = {"on": [], "off": []}
        prompt_tokens = 0
        for rep in range(reps + 1):
            for name, m in (("on", on), ("off", off)):
                done = run_runtime(m, images, max_new_tokens)
                prompt_tokens = done.stats.prompt_tokens
                if rep:
                    samples[name].append(done.stats.decode_tokens_per_s)
        r = {f"decode_tps_{k}": summarize(v) for k, v in samples.items()}
        r["ratio_on_over_off"] = r["decode_tps_on"]["median"] / r["decode_tps_off"]["median"]
        r["prompt_tokens"] = prompt_tokens
        results[scenario] = r
    results["max_new_tokens"] = max_new_tokens
    return results


def preprocessing_by_size(model, reps: int) -> list[dict]:
    rows = []
    for width, height in ((64, 64), (336, 336), (640, 400), (1344, 1008), (2016, 1512), (4032, 3024)):
        png = photo_image(width, height)
        img = Image.open(io.BytesIO(png))
        jpg = io.BytesIO()
        img.save(jpg, format="JPEG", quality=90)
        for fmt, data in (("png", png), ("jpeg", jpg.getvalue())):
            load, proc = [], []
            for rep in range(reps + 1):
                t0 = time.perf_counter()
                image = load_image("-", stdin=io.BytesIO(data))
                t1 = time.perf_counter()
                image_tokens = prepare(model, QUESTION, [image]).image_tokens
                t2 = time.perf_counter()
                if rep:
                    load.append(t1 - t0)
                    proc.append(t2 - t1)
            rows.append({"width": width, "height": height, "format": fmt, "bytes": len(data),
                         "image_tokens": image_tokens[0], "load_s": summarize(load), "processor_s": summarize(proc)})
    return rows


def markdown(result: dict) -> str:
    rv = result["runtime_vs_bare"]
    ms = lambda x: f"{x * 1000:.1f} ms"  # noqa: E731
    lines = [f"# Runtime overhead on {result['model']} ({result['environment']['cpu']}, "
             f"{result['environment']['cores']} cores)", "",
             f"Command: `{result['command']}`", "",
             f"## phi3v-ort vs a bare og loop (one 640x400 chart, {rv['max_new_tokens']} new tokens, "
             f"median of {rv['runtime_decode_tps']['n']})", "",
             "| | bare og loop | phi3v-ort | ratio |", "|---|---|---|---|",
             f"| time to first token (processor + prefill) | {ms(rv['bare_ttft_s']['median'])} | "
             f"{ms(rv['runtime_ttft_s']['median'])} | {rv['ratio_ttft']:.3f} |",
             f"| prefill | {ms(rv['bare_prefill_s']['median'])} | {ms(rv['runtime_prefill_s']['median'])} | "
             f"{rv['runtime_prefill_s']['median'] / rv['bare_prefill_s']['median']:.3f} |",
             f"| decode tokens/s | {rv['bare_decode_tps']['median']:.1f} | {rv['runtime_decode_tps']['median']:.1f} | "
             f"{rv['ratio_decode_tps']:.3f} |", "",
             f"Greedy tokens identical on both sides: {rv['tokens_equal']}.", "",
             f"## Shared KV buffer on vs off (decode tokens/s, {result['share_buffer']['max_new_tokens']} new tokens)",
             "", "| prompt | prompt tokens | on | off | on/off |", "|---|---|---|---|---|"]
    for scenario in ("text-only", "one image"):
        r = result["share_buffer"][scenario]
        lines.append(f"| {scenario} | {r['prompt_tokens']} | {r['decode_tps_on']['median']:.1f} | "
                     f"{r['decode_tps_off']['median']:.1f} | {r['ratio_on_over_off']:.3f} |")
    lines += ["", "## Preprocessing per image (Pillow load + og processor, median)", "",
              "| size | format | bytes | image tokens | load | processor | total |", "|---|---|---|---|---|---|---|"]
    for row in result["preprocessing"]:
        load, proc = row["load_s"]["median"], row["processor_s"]["median"]
        lines.append(f"| {row['width']}x{row['height']} | {row['format']} | {row['bytes']:,} | {row['image_tokens']} "
                     f"| {ms(load)} | {ms(proc)} | {ms(load + proc)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True, help="Result path without extension (.json and .md are written).")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    model = load_model(args.model_dir, device="cpu")
    result = {
        "benchmark": "runtime_overhead",
        "command": " ".join(["python", *sys.argv]),
        "model": str(Path(args.model_dir).name),
        "package": {k: str(v) if isinstance(v, Path) else v for k, v in vars(model.info).items() if k != "files"},
        "settings": {"reps": args.reps, "warmup": 1, "max_new_tokens": args.max_new_tokens, "greedy": True,
                     "ignore_eos": True, "device": model.device},
        "environment": environment(),
    }
    print("runtime vs bare og loop ...", file=sys.stderr)
    result["runtime_vs_bare"] = runtime_vs_bare(model, args.reps, args.max_new_tokens)
    print("shared buffer on vs off ...", file=sys.stderr)
    result["share_buffer"] = share_buffer_on_off(model, args.reps, args.max_new_tokens * 2)
    print("preprocessing by image size ...", file=sys.stderr)
    result["preprocessing"] = preprocessing_by_size(model, args.reps)
    write_result(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
