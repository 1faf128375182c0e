#!/usr/bin/env python3
"""Intra-op threads that spin while they wait, or not, on a quiet and on a busy machine.

    python benchmarks/thread_spinning.py --model-dir /tmp/small-int4-cpu --out benchmarks/results/thread-spinning-cpu-small

onnxruntime's intra-op threads spin for a while before they sleep; og 0.18 passes the session config entry
`"session.intra_op.allow_spinning": "0"` through (package/loading.py's overlay). Arms: the default threads with
spinning on (onnxruntime's default), the default threads with spinning off, and one thread (no pool, nothing to
spin). Conditions: quiet, and busy (a CPU hog beside it: another process spinning on one core, as a test run or
another worker would). Measured per arm and condition, all arms loaded in one process and interleaved after a
warm-up round: a text prompt's prefill (no vision: the decoder alone), decode tokens/s (EOS ignored), and the time
to first token of the 640x400 chart at 4 crops (vision + prefill).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "runtime"))

from phi3v_ort.bench.common import chart_image, environment, image_input, summarize, write_result  # noqa: E402
from phi3v_ort.engine.generation import generate  # noqa: E402
from phi3v_ort.engine.settings import GenerationSettings  # noqa: E402
from phi3v_ort.engine.model import load_model  # noqa: E402
from phi3v_ort.package.loading import default_threads  # noqa: E402

TEXT = ("Write a long story about a lighthouse keeper, the sea, the storms of the winter and the ships that pass "
        "by the rocks at night. ") * 20
HOG = "while True: pass"


def measure(model, chart: bytes, new_tokens: int) -> dict:
    text = generate(model, TEXT, (), GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True)).stats
    image = generate(model, "Describe the chart.", [image_input(chart, "chart.png")],
                     GenerationSettings(max_new_tokens=2), crops=4).stats
    return {"text_prefill_s": text.prefill_s, "text_prompt_tokens": text.prompt_tokens,
            "decode_tps": text.decode_tokens_per_s, "image_ttft_s": image.time_to_first_token_s}


def run_condition(arms: dict, chart: bytes, rounds: int, new_tokens: int, busy: bool) -> dict:
    hog = subprocess.Popen([sys.executable, "-c", HOG]) if busy else None
    load_before = os.getloadavg()[0]  # the machine is shared: what else ran is part of the result
    try:
        samples = {name: [] for name in arms}
        names = list(arms)
        for rep in range(rounds + 1):  # round 0 is the warm-up
            for name in (names if rep % 2 else names[::-1]):
                print(f"{'busy' if busy else 'quiet'} round {rep}: {name}", file=sys.stderr, flush=True)
                result = measure(arms[name], chart, new_tokens)
                if rep:
                    samples[name].append(result)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    out = {name: {k: summarize([s[k] for s in runs]) for k in runs[0]} for name, runs in samples.items()}
    out["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    return out


def markdown(result: dict) -> str:
    env, st = result["environment"], result["settings"]
    lines = [f"# Intra-op spinning on {result['model']} ({env['cpu']}, {env['cores']} cores)", "",
             f"Command: `{result['command']}`", "",
             f"Medians of {st['rounds']} interleaved rounds after a warm-up round; text prompt of "
             f"{st['text_prompt_tokens']} tokens, {st['new_tokens']} new tokens (EOS ignored); image: the 640x400 "
             "chart at 4 crops. Busy: one process spinning on one core beside it. Shared machine (other work "
             "may run too): compare the arms within a condition. Versions: "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".", "",
             "| condition | arm | text prefill ms | decode tokens/s | image time to first token ms |",
             "|---|---|---|---|---|"]
    for cond in ("quiet", "busy"):
        for arm, m in result[cond].items():
            if arm == "load_average_1min":
                continue
            lines.append(f"| {cond} | {arm} | {m['text_prefill_s']['median'] * 1000:.0f} | "
                         f"{m['decode_tps']['median']:.1f} | {m['image_ttft_s']['median'] * 1000:.0f} |")
    lines += ["", "Spinning off over on (the default threads; < 1 is faster for times, > 1 for tokens/s):", "",
              "| condition | text prefill | decode tokens/s | image time to first token |", "|---|---|---|---|"]
    for cond in ("quiet", "busy"):
        on, off = result[cond][result["arm_names"]["on"]], result[cond][result["arm_names"]["off"]]
        lines.append(f"| {cond} | {off['text_prefill_s']['median'] / on['text_prefill_s']['median']:.2f} | "
                     f"{off['decode_tps']['median'] / on['decode_tps']['median']:.2f} | "
                     f"{off['image_ttft_s']['median'] / on['image_ttft_s']['median']:.2f} |")
    lines += ["", "Load average (1 min) before / after each condition: " + "; ".join(
        f"{c} {result[c]['load_average_1min']['before']:.1f} / {result[c]['load_average_1min']['after']:.1f}"
        for c in ("quiet", "busy")) + f" on {env['cores']} cores."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True, help="Result path without extension (.json and .md are written).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    threads = default_threads()
    on, off = f"{threads} threads, spinning on", f"{threads} threads, spinning off"
    arms = {on: load_model(args.model_dir, "cpu", threads=threads, spinning=True),
            off: load_model(args.model_dir, "cpu", threads=threads, spinning=False),
            "1 thread": load_model(args.model_dir, "cpu", threads=1)}
    chart = chart_image(640, 400)
    result = {"benchmark": "thread_spinning", "command": " ".join(["python", *sys.argv]),
              "model": Path(args.model_dir).name,
              "settings": {"rounds": args.rounds, "warmup": 1, "new_tokens": args.new_tokens, "threads": threads,
                           "crops": 4, "busy": f"one `python -c '{HOG}'` process", "device": "cpu"},
              "environment": environment(), "arm_names": {"on": on, "off": off}}
    result["quiet"] = run_condition(arms, chart, args.rounds, args.new_tokens, busy=False)
    result["busy"] = run_condition(arms, chart, args.rounds, args.new_tokens, busy=True)
    result["settings"]["text_prompt_tokens"] = int(result["quiet"][on]["text_prompt_tokens"]["median"])
    write_result(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
