#!/usr/bin/env python3
"""Structured output: decode tokens/s with and without each output constraint, and what a constraint costs to set up.

    python benchmarks/structured_output.py --model-dir models/small-int4-cpu \
        --out benchmarks/results/structured-output-cpu-small

Every configuration answers the same prompt (one chart image at a crop budget of 1, so the prefill stays short,
and the same question), greedy, `--max-new-tokens` at most; the configurations run interleaved, one round after
another, after a warm-up round, and the tables give medians (and p90) of the rounds. A constrained answer cannot
ignore the end token (GenerationSettings refuses ignore_eos with a constraint: og would mask the only token a
complete answer allows), so each row reports how many tokens it generated and why it stopped; the unconstrained
baseline runs with ignore_eos, and the constraints were chosen to keep going on random weights (a free string).

Setup: og compiles a constraint when a generator is created (settings.create_generator), before the prefill. The
setup table times create_generator alone (no prefill): the first call in a fresh process (the model loaded, nothing
generated yet: a subprocess per constraint, so each one is really the first), and the median of later calls in
this process, beside the same for no constraint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from phi3v_ort.engine import guidance as G  # noqa: E402
from phi3v_ort.bench.common import chart_image, environment, image_input, summarize, write_result  # noqa: E402
from phi3v_ort.engine.generation import Finished, stream  # noqa: E402
from phi3v_ort.engine.model import load_model  # noqa: E402
from phi3v_ort.engine.settings import GenerationSettings, create_generator  # noqa: E402

QUESTION = "Describe this chart as JSON with a description field."
CONSTRAINTS = {
    "none": None,
    "json_schema": G.json_schema({"type": "object", "properties": {"description": {"type": "string"}},
                                  "required": ["description"], "additionalProperties": False}),
    "json_object": G.json_object(),
    "regex": G.regex(r"[a-z]+( [a-z]+)*"),
    "lark_grammar": G.lark_grammar('start: WORD (" " WORD)*\nWORD: /[a-z]+/\n'),
}


def run_once(model, images, constraint, max_new_tokens: int, crops: int):
    settings = GenerationSettings(max_new_tokens=max_new_tokens, guidance=constraint, ignore_eos=constraint is None)
    for event in stream(model, QUESTION, images, settings, crops=crops):
        if isinstance(event, Finished):
            return event
    raise AssertionError("no Finished event")


def time_create(model, name: str) -> float:
    settings = GenerationSettings(max_new_tokens=16, guidance=CONSTRAINTS[name])
    t = time.perf_counter()
    generator = create_generator(model.og_model, settings, 64, model.policy.share_buffer)
    elapsed = time.perf_counter() - t
    del generator
    return elapsed


def first_in_fresh_process(model_dir: str, name: str) -> float:
    """create_generator's first call in a new process that has just loaded the model."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--model-dir", model_dir, "--first-setup", name],
                         check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def setup_times(model, model_dir: str, reps: int) -> dict:
    """create_generator alone per constraint: first in a fresh process, then `reps` calls here after a warm-up."""
    out = {}
    for name in CONSTRAINTS:
        time_create(model, name)  # warm-up in this process
        later = [time_create(model, name) for _ in range(reps)]
        out[name] = {"first_s": first_in_fresh_process(model_dir, name), "later": summarize(later)}
    return out


def decode_rates(model, reps: int, max_new_tokens: int, crops: int) -> dict:
    images = [image_input(chart_image(), "chart.png")]
    samples = {name: {"decode_tps": [], "prefill_s": [], "generated": [], "finish": []} for name in CONSTRAINTS}
    texts = {}
    for rep in range(reps + 1):  # the first round is the warm-up
        for name, constraint in CONSTRAINTS.items():
            done = run_once(model, images, constraint, max_new_tokens, crops)
            texts[name] = done.text
            if rep == 0:
                continue
            s = samples[name]
            s["decode_tps"].append(done.stats.decode_tokens_per_s)
            s["prefill_s"].append(done.stats.prefill_s)
            s["generated"].append(done.stats.generated_tokens)
            s["finish"].append(done.stats.finish_reason)
    out = {}
    for name, s in samples.items():
        result = G.outcome(CONSTRAINTS[name], texts[name], s["finish"][-1], s["generated"][-1])
        out[name] = {"decode_tps": summarize(s["decode_tps"]), "prefill_s": summarize(s["prefill_s"]),
                     "generated_tokens": s["generated"], "finish_reasons": s["finish"],
                     "constraint": CONSTRAINTS[name].data if CONSTRAINTS[name] else None,
                     "last_text_head": texts[name][:80], "complete": result.complete}
    base = out["none"]["decode_tps"]["median"]
    for name in out:
        out[name]["ratio_to_none"] = out[name]["decode_tps"]["median"] / base if base else float("nan")
    return out


def markdown(result: dict) -> str:
    cfg = result["settings"]
    env = result["environment"]
    lines = [f"# Structured output on {Path(cfg['model_dir']).name} ({env['cpu']}, {env['cores']} cores, shared)", "",
             f"Command: `{result['command']}`", "",
             "The machine is 2 shared cores: read the ratios measured side by side in one run, not absolute numbers "
             "across runs.", "",
             f"## Decode tokens/s ({cfg['max_new_tokens']} new tokens at most, one chart image at crops "
             f"{cfg['crops']}, greedy, median of {cfg['reps']} rounds after a warm-up)", "",
             "| constraint | decode tokens/s (median) | p90 | vs none | generated tokens | finish | prefill |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["decode"].items():
        gen = sorted(set(r["generated_tokens"]))  # a rate over a few tokens (an answer that ended early) is noise
        ratio = f"{r['ratio_to_none']:.3f}" if max(gen) >= 16 else "n/a (ended early: a rate over 2 intervals)"
        lines.append(f"| {name} | {r['decode_tps']['median']:.1f} | {r['decode_tps']['p90']:.1f} | {ratio} | "
                     f"{', '.join(map(str, gen))} | {', '.join(sorted(set(r['finish_reasons'])))} | "
                     f"{r['prefill_s']['median'] * 1000:.0f} ms |")
    lines += ["", "`none` runs with ignore_eos (a constrained answer cannot: it ends when complete). The constraints "
              "(the runtime adds compact whitespace to the schemas):", ""]
    for name, r in result["decode"].items():
        if r["constraint"]:
            shown = json.dumps(r["constraint"])[1:-1] if "\n" in r["constraint"] else r["constraint"]  # one line
            lines.append(f"- {name}: `{shown}`"
                         + (f" (its answer: `{r['last_text_head']}`)" if name == "json_object" else ""))
    lines += ["", "## Setup: creating the og generator (compiles the constraint; no prefill; max_length 64)", "",
              "| constraint | first call in a fresh process | later calls (median) | p90 |", "|---|---|---|---|"]
    for name, r in result["setup"].items():
        lines.append(f"| {name} | {r['first_s'] * 1000:.1f} ms | {r['later']['median'] * 1000:.1f} ms | "
                     f"{r['later']['p90'] * 1000:.1f} ms |")
    first = result["setup"]
    extra = {n: (r["first_s"] - first["none"]["first_s"]) * 1000 for n, r in first.items() if n != "none"}
    lines += ["", "The first guided request of a process pays "
              + ", ".join(f"{n} +{ms:.0f} ms" for n, ms in extra.items())
              + " over an unguided first generator; later requests pay what the last column says.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="models/small-int4-cpu")
    parser.add_argument("--out", default="benchmarks/results/structured-output-cpu-small")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--crops", type=int, default=1)
    parser.add_argument("--first-setup", choices=list(CONSTRAINTS), help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()
    model = load_model(args.model_dir, device="cpu")
    if args.first_setup:
        print(time_create(model, args.first_setup))
        return
    result = {"command": "python benchmarks/structured_output.py " + " ".join(sys.argv[1:]),
              "environment": environment(),
              "settings": {"model_dir": args.model_dir, "reps": args.reps, "max_new_tokens": args.max_new_tokens,
                           "crops": args.crops, "question": QUESTION, "threads": model.threads},
              "setup": setup_times(model, args.model_dir, args.reps),
              "decode": decode_rates(model, args.reps, args.max_new_tokens, args.crops)}
    write_result(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
