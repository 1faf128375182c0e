#!/usr/bin/env python3
"""One package exported two ways, side by side: its vision model's crop axis dynamic (the runtime feeds the crop
slots a request uses) against the same graph and weights declared with a fixed 17 slots (all fed, as before).

    python scripts/make_synthetic_model.py --preset small --out /tmp/small-int4-cpu
    python benchmarks/crop_slots.py --model-dir /tmp/small-int4-cpu --out benchmarks/results/crop-slots-cpu-small

The fixed-17 twin is a copy whose vision .onnx declares 17 (export.crop_axis.declare_crop_slots: exactly what the
exporter wrote before; weights shared). In one process, interleaved (the machine is shared: read the ratios):
1. bench's vision sweep: the vision model alone (bench.engines.OrtEngine.vision_seconds) on one image of 1..16
   crops, fed the slots each package's pipeline feeds;
2. input_pipeline.py's time to first token (its `first_token`: wall clock from the image bytes to the first token
   event, max_new_tokens=2) for the 640x400 chart at crop budgets 1, 4, 8, 16 and og's processor (always 17
   slots), on both packages.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "runtime"))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from input_pipeline import first_token  # noqa: E402
from phi3v_ort.bench.common import chart_image, environment, summarize, write_result  # noqa: E402
from phi3v_ort.bench.engines import OrtEngine  # noqa: E402
from phi3v_ort.bench.scenarios import SWEEP_GRIDS  # noqa: E402
from phi3v_ort.export.crop_axis import declare_crop_slots  # noqa: E402
from phi3v_ort.package import contract  # noqa: E402
from phi3v_ort.package.loading import read_package  # noqa: E402

TTFT_CONFIGS = (("own", 1), ("own", 4), ("own", 8), ("own", 16), ("og", 16))
# targets of issue 22 for the dynamic axis, time to first token over the fixed-17 export's, by crop budget
TARGETS = {1: 0.35, 4: 0.5, 16: 0.9}


def fixed_twin(model_dir: Path, tmp: Path) -> Path:
    twin = tmp / (model_dir.name + "-fixed17")
    shutil.copytree(model_dir, twin)
    declare_crop_slots(twin / read_package(twin).files.vision, contract.PIXEL_CROPS)
    return twin


def interleaved(engines: dict, rounds: int, run) -> dict:
    """run(name, engine) for every engine, `rounds` + 1 times (round 0 is the warm-up), alternating the order."""
    samples = {name: [] for name in engines}
    names = list(engines)
    for rep in range(rounds + 1):
        for name in (names if rep % 2 else names[::-1]):
            result = run(name, engines[name])
            if rep:
                samples[name].append(result)
    return samples


def vision_sweep(engines: dict, reps: int) -> list[dict]:
    rng = np.random.default_rng(0)
    pixel_values = rng.normal(size=(1, contract.PIXEL_CROPS, 3, 336, 336)).astype(np.float32)
    rows = []
    for r, c in SWEEP_GRIDS:
        print(f"vision sweep {r * c} crops", file=sys.stderr, flush=True)
        sizes = np.array([[r * 336, c * 336]], dtype=np.int64)
        slots = {name: e.vision_slots(1 + r * c) for name, e in engines.items()}
        samples = interleaved(engines, reps, lambda name, e: e.vision_seconds(
            np.ascontiguousarray(pixel_values[:, :slots[name]]), sizes))
        row = {"crops": r * c, **{name: {**summarize(s), "slots": slots[name]} for name, s in samples.items()}}
        row["dynamic_over_fixed"] = row["dynamic"]["median"] / row["fixed-17"]["median"]
        rows.append(row)
    return rows


def time_to_first_token(engines: dict, reps: int, configs=TTFT_CONFIGS) -> list[dict]:
    data = chart_image(640, 400)
    rows = []
    for processor, crops in configs:
        print(f"time to first token: {processor} {crops} crops", file=sys.stderr, flush=True)
        samples = interleaved(engines, reps, lambda name, e: first_token(e.model, data, processor, crops))
        row = {"processor": processor, "crops": crops, "prompt_tokens": samples["dynamic"][0]["prompt_tokens"],
               "image_tokens": samples["dynamic"][0]["image_tokens"]}
        for name, runs in samples.items():
            row[name] = {k: summarize([x[k] for x in runs]) for k in ("ttft_wall_s", "preprocess_s", "prefill_s")}
        row["dynamic_over_fixed"] = row["dynamic"]["ttft_wall_s"]["median"] / row["fixed-17"]["ttft_wall_s"]["median"]
        if processor == "own" and crops in TARGETS:
            row["target"] = TARGETS[crops]
            row["target_met"] = row["dynamic_over_fixed"] <= TARGETS[crops]
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    env = result["environment"]
    ms = lambda x: f"{x * 1000:.0f}"  # noqa: E731
    lines = [f"# Crop slots: {result['model']} with a dynamic crop axis vs the same export declared fixed 17 "
             f"({env['cpu']}, {env['cores']} cores)", "", f"Command: `{result['command']}`", "",
             "Same graph and weights; only the vision input's declared crop axis differs, so the runtime feeds the "
             "dynamic one only the slots the image uses (the largest 1 + rows * cols). Both packages loaded in one "
             f"process, every measurement interleaved after a warm-up round, {result['settings']['threads']} "
             "intra-op threads, run under `nice` on a shared machine: read the ratios. Versions: "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".", "",
             f"## Time to first token, one 640x400 chart (median / p90 ms, {result['settings']['ttft_reps']} reps)",
             "", "input_pipeline.py's measurement: wall clock from the image bytes to the first token event.", "",
             "| processor | crop budget | image tokens | slots fed (dynamic) | fixed 17 | **dynamic** | dynamic / fixed "
             "| target | met |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["ttft"]:
        slots = 17 if r["processor"] == "og" else 1 + r["rows_cols"]
        lines.append(f"| {r['processor']} | {r['crops']} | {r['image_tokens']} | {slots} | "
                     f"{ms(r['fixed-17']['ttft_wall_s']['median'])} / {ms(r['fixed-17']['ttft_wall_s']['p90'])} | "
                     f"{ms(r['dynamic']['ttft_wall_s']['median'])} / {ms(r['dynamic']['ttft_wall_s']['p90'])} | "
                     f"**{r['dynamic_over_fixed']:.2f}** | {('<= %.2f' % r['target']) if 'target' in r else '-'} | "
                     f"{('yes' if r['target_met'] else '**no**') if 'target' in r else '-'} |")
    lines += ["", f"## Vision model alone by crop count (bench's vision sweep; median ms, "
              f"{result['settings']['sweep_reps']} reps)", "",
              "| crops | slots fed (dynamic) | fixed 17 | dynamic | dynamic / fixed |", "|---|---|---|---|---|"]
    for r in result["vision_sweep"]:
        lines.append(f"| {r['crops']} | {r['dynamic']['slots']} | {ms(r['fixed-17']['median'])} | "
                     f"{ms(r['dynamic']['median'])} | {r['dynamic_over_fixed']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="A package whose vision crop axis is dynamic.")
    parser.add_argument("--out", required=True, help="Result path without extension (.json and .md are written).")
    parser.add_argument("--ttft-reps", type=int, default=3)
    parser.add_argument("--sweep-reps", type=int, default=3, help="0: no vision sweep.")
    parser.add_argument("--crops", default=None, metavar="N,N,...",
                        help="Only these crop budgets in the time-to-first-token table (own processor) [default: "
                        "1,4,8,16 and og's 16].")
    args = parser.parse_args()
    configs = TTFT_CONFIGS if args.crops is None else tuple(("own", int(c)) for c in args.crops.split(","))

    model_dir = Path(args.model_dir).resolve()
    with tempfile.TemporaryDirectory(prefix="phi3v-crop-slots-") as tmp:
        engines = {"dynamic": OrtEngine(str(model_dir), "cpu"), "fixed-17": OrtEngine(str(fixed_twin(model_dir,
                                                                                                       Path(tmp))), "cpu")}
        if engines["dynamic"].model.builder.crop_slots is not None:
            sys.exit(f"{model_dir}'s vision model declares a fixed crop axis: export it again (dynamic) first")
        result = {"benchmark": "crop_slots", "command": " ".join(["python", *sys.argv]), "model": model_dir.name,
                  "settings": {"ttft_reps": args.ttft_reps, "sweep_reps": args.sweep_reps, "warmup": 1,
                               "device": "cpu", "threads": engines["dynamic"].threads, "max_new_tokens": 2,
                               "image": "chart 640x400 PNG (bench.common.chart_image)"},
                  "environment": environment(),
                  "load_s": {name: e.load_s for name, e in engines.items()}}
        result["ttft"] = time_to_first_token(engines, args.ttft_reps, configs)
        for r in result["ttft"]:
            h, w = contract.hd_size(640, 400, r["crops"])
            r["rows_cols"] = (h // 336) * (w // 336)
        result["vision_sweep"] = vision_sweep(engines, args.sweep_reps) if args.sweep_reps else []
    write_result(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
