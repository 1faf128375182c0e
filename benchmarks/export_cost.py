#!/usr/bin/env python3
"""What `phi3v-ort export` costs on this machine: wall time per phase and peak memory, per preset and variant.

    python benchmarks/export_cost.py --preset small --variants cpu-int4,cpu-fp32 --reps 3 \
        --out benchmarks/results/export-cpu-small
    python benchmarks/export_cost.py --preset full --variants cpu-int4 --reps 1 \
        --out benchmarks/results/export-cpu-full

A random checkpoint of the preset is written once in the real published layout (bfloat16 shards, as
scripts/make_synthetic_model.py writes it; its own time and peak are reported too), then each variant is exported
`--reps` times by the command line, each in a fresh process (`phi3v-ort export --json --overwrite`), exactly as a
user runs it. The first export of each variant also runs the built-in check (its time and peak are reported apart);
the others pass --no-check. Peak memory is the exporter's own figure: the resident set of the export process plus
the model builder's process, summed and sampled every 50 ms (phi3v_ort.export.memory), checked here against the
same sampler run from outside around the whole command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from phi3v_ort.bench.common import environment, summarize, write_result  # noqa: E402
from phi3v_ort.export.memory import PeakMemory  # noqa: E402
from phi3v_ort.export.variants import VARIANTS  # noqa: E402
from phi3v_ort.synthetic.presets import PRESETS  # noqa: E402
from phi3v_ort.synthetic.random_checkpoint import write_random_checkpoint  # noqa: E402

GIB = 2**30


def export_once(ckpt: Path, out: Path, variant: str, check: bool) -> dict:
    cmd = [sys.executable, "-m", "phi3v_ort", "export", "--checkpoint", str(ckpt), "--out", str(out),
           "--variant", variant, "--json", "--overwrite", *(() if check else ("--no-check",))]
    t = time.perf_counter()
    with PeakMemory() as outside:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"export failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout)
    result["command_wall_s"] = round(wall, 2)
    result["outside_peak_pss_bytes"] = outside.peak_pss
    return result


def builder_int4_baseline(ckpt: Path, work: Path) -> dict:
    """onnxruntime-genai's builder, `-p int4 -e cpu` with the CPU release's options, on the decoder staged as the
    exporter stages it: the before of the exporter's int4 path."""
    from phi3v_ort.export.checkpoint import Checkpoint
    from phi3v_ort.export.decoder import stage_decoder

    stage_decoder(Checkpoint.open(ckpt), work / "hf")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(work / "hf"), "-o", str(work / "out"),
           "-p", "int4", "-e", "cpu", "-c", str(work / "cache"), "--extra_options", "exclude_embeds=true",
           "int4_block_size=32", "int4_accuracy_level=4"]
    t = time.perf_counter()
    with PeakMemory() as peak:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the builder failed:\n{proc.stderr[-3000:]}")
    return {"command": " ".join(cmd[1:]), "seconds": round(time.perf_counter() - t, 2),
            "peak_pss_bytes": peak.peak_pss, "peak_system_used_bytes": peak.peak_system_used}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="small")
    ap.add_argument("--variants", default="cpu-int4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", default="models/.export-bench", help="Where the checkpoint and packages go.")
    ap.add_argument("--keep", action="store_true", help="Keep the checkpoint and packages afterwards.")
    ap.add_argument("--builder-int4-baseline", action="store_true",
                    help="Also run onnxruntime-genai's builder with its own -p int4 on the same staged decoder (what "
                    "the exporter replaces with its weight-by-weight pass), for its time and peak memory.")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")

    work = Path(args.work) / args.preset
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt = work / "checkpoint"
    t = time.perf_counter()
    with PeakMemory() as writing:
        write_random_checkpoint(ckpt, PRESETS[args.preset], "phi-3", seed=0)
    checkpoint = {"seconds": round(time.perf_counter() - t, 2), "peak_pss_bytes": writing.peak_pss,
                  "bytes_on_disk": sum(f.stat().st_size for f in ckpt.iterdir())}
    print(f"checkpoint: {checkpoint}", file=sys.stderr, flush=True)

    runs: dict[str, list[dict]] = {}
    for v in variants:
        runs[v] = []
        for rep in range(args.reps):
            r = export_once(ckpt, work / v, v, check=rep == 0)
            print(f"{v} #{rep + 1}: {r['phases_s']}, peak {r['peak_pss_bytes'] / GIB:.2f} GiB", file=sys.stderr,
                  flush=True)
            runs[v].append(r)
    baseline = builder_int4_baseline(ckpt, work / "baseline") if args.builder_int4_baseline else None
    if baseline:
        print(f"builder -p int4: {baseline}", file=sys.stderr, flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    summary = {}
    phase_names = ("vision_and_embedding", "decoder_staging", "decoder_builder", "decoder_quantize", "decoder_place")
    for v, rs in runs.items():
        s = {
            "export_s": summarize([r["phases_s"]["export"] for r in rs]),
            **{f"{ph}_s": summarize([r["phases_s"][ph] for r in rs]) for ph in phase_names if ph in rs[0]["phases_s"]},
            "command_wall_s": summarize([r["command_wall_s"] for r in rs]),
            "peak_pss_gib": summarize([r["peak_pss_bytes"] / GIB for r in rs]),
            "peak_system_used_gib": summarize([r["peak_system_used_bytes"] / GIB for r in rs]),
            "outside_peak_pss_gib": summarize([r["outside_peak_pss_bytes"] / GIB for r in rs]),
            "phase_peak_pss_gib": {ph: max(r["phase_peak_pss_bytes"].get(ph, 0) for r in rs) / GIB
                                   for ph in phase_names if ph in rs[0]["phase_peak_pss_bytes"]},
            "check_s": rs[0]["phases_s"].get("check"),
            "check_peak_pss_gib": (rs[0]["check_peak_pss_bytes"] or 0) / GIB,
            "check": rs[0]["check"],
        }
        summary[v] = s
        check = s["check"] or {}
        last = "decoder_quantize" if "decoder_quantize_s" in s else "decoder_place"
        phases = ", ".join(f"{ph.replace('decoder_', '')} {gib:.1f}" for ph, gib in s["phase_peak_pss_gib"].items())
        rows.append(f"| {v} | {s['export_s']['median']:.1f} | {s['vision_and_embedding_s']['median']:.1f} | "
                    f"{s['decoder_staging_s']['median']:.1f} | {s['decoder_builder_s']['median']:.1f} | "
                    f"{s[last + '_s']['median']:.1f} | **{max(s['peak_pss_gib']['samples']):.2f}** ({phases}) | "
                    f"{max(s['peak_system_used_gib']['samples']):.2f} | {s['check_s']:.1f} | "
                    f"{s['check_peak_pss_gib']:.2f} | {check.get('agreement')}/{check.get('steps')}, rel "
                    f"{check.get('relative_diff') or float('nan'):.2g} ({check.get('passed')}) |")
    p = PRESETS[args.preset]
    command = "python benchmarks/export_cost.py " + " ".join(sys.argv[1:])
    md = "\n".join([
        f"# Export cost: preset `{args.preset}` ({p.num_layers}x{p.hidden_size} decoder, CLIP "
        f"{p.clip_layers}x{p.clip_hidden_size}), this machine",
        "",
        f"`{command}`",
        "",
        f"Random checkpoint in the real layout (bfloat16, 2 shards): {checkpoint['bytes_on_disk'] / 1e9:.2f} GB, "
        f"written in {checkpoint['seconds']:.1f} s, peak {checkpoint['peak_pss_bytes'] / GIB:.2f} GiB.",
        "",
        f"Medians of {args.reps} export(s) per variant, each a fresh `phi3v-ort export` process. Peak: the export's "
        "process tree (PSS: the export process, its vision-export child and the model builder), the largest of "
        "the runs, with each phase's peak; machine used: MemTotal - MemAvailable at its highest (includes this "
        "benchmark's own process and the page cache the kernel cannot drop). The check ran once per variant (the "
        "first export); passed: True/False for fp32, None (report only) for int4/fp16.",
        "",
        "| variant | export s | vision + embedding s | decoder staging s | builder s | int4 quantize (or place) s | "
        "peak GiB (per phase) | machine used GiB | check s | check peak GiB | check: top-1 agreement, relative "
        "logit diff (passed) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *([f"Before: onnxruntime-genai's builder with its own `-p int4` (CPU release options) on the same staged decoder "
           f"-- the step the exporter replaces with its weight-by-weight int4 pass (byte-identical output, "
           f"tests/export/test_export_quantize.py): {baseline['seconds']:.0f} s, peak **{baseline['peak_pss_bytes'] / GIB:.2f} "
           f"GiB** (PSS of its process and this one's), machine used {baseline['peak_system_used_bytes'] / GIB:.2f} GiB.",
           ""] if baseline else []),
    ])
    result = {"benchmark": "export_cost", "command": command, "environment": environment(),
              "settings": {"preset": args.preset, "variants": variants, "reps": args.reps},
              "checkpoint": checkpoint, "summary": summary, "runs": runs, "builder_int4_baseline": baseline}
    write_result(args.out, result, md)


if __name__ == "__main__":
    main()
