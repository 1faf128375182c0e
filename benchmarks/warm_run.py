#!/usr/bin/env python3
"""Whole-process `phi3v-ort run`, cold (loads the model itself: --no-server) against warm (a running `phi3v-ort
serve` of the same package answers: --server auto), a text question and one image.

    python scripts/make_synthetic_model.py --preset small --out /tmp/small
    nice python benchmarks/warm_run.py --model-dir /tmp/small --out benchmarks/results/warm-run-cpu-small

What is timed: the wall time of the whole `python -m phi3v_ort run ...` process, from spawn to exit (interpreter
start, imports, finding the server or loading the model, the answer, exit), the way a user or a script feels it.
Runs alternate cold and warm (so a busy moment of a shared machine hits both), after one untimed warm-up of each;
greedy, a fixed `--max-new-tokens`, `--json` to /dev/null. Each warm answer is checked to have come from the
server (`stats.warm`) and each cold one not to. The server runs with the same default threads as `run`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))

from phi3v_ort.bench.common import environment, summarize, write_result  # noqa: E402

QUESTIONS = {"text": ("Tell me a joke.", []),
             "image": ("Could you please introduce this stock to me?", [str(ROOT / "tests" / "data" / "chart.png")])}


def run_once(model_dir: str, question: str, images: list[str], warm: bool, max_new_tokens: int,
             env: dict) -> tuple[float, dict]:
    """One whole `run` process: (wall seconds, its --json output)."""
    cmd = [sys.executable, "-m", "phi3v_ort", "run", "--model-dir", model_dir, "--json",
           "--max-new-tokens", str(max_new_tokens), "--server", "auto" if warm else "off",
           *[a for path in images for a in ("-i", path)], question]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {proc.stderr.strip()}")
    out = json.loads(proc.stdout)
    if out["stats"]["warm"] is not warm:
        raise SystemExit(f"expected warm={warm}, the answer says {out['stats']['warm']}: {proc.stderr.strip()}")
    return wall, out


def start_server(model_dir: str, env: dict, log: Path) -> subprocess.Popen:
    from phi3v_ort.client import registry

    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "phi3v_ort", "serve", "--model-dir", model_dir, "--port",
                                 "0", "--quiet"], stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while not (Path(env[registry.STATE_DIR_ENV]) / f"server-{proc.pid}.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the server did not start: " + log.read_text())
        time.sleep(0.1)
    return proc


def measure(model_dir: str, repeats: int, max_new_tokens: int, env: dict) -> dict:
    results = {}
    for name, (question, images) in QUESTIONS.items():
        for warm in (False, True):  # warm-up, untimed: page cache, pyc files, the server's first request
            run_once(model_dir, question, images, warm, max_new_tokens, env)
        cold, warm, tokens, engine = [], [], None, []
        for _ in range(repeats):
            for is_warm, samples in ((False, cold), (True, warm)):
                wall, out = run_once(model_dir, question, images, is_warm, max_new_tokens, env)
                samples.append(wall)
                if is_warm:  # what the server's engine spent on the answer (prefill + decode) of that wall time
                    engine.append(out["stats"]["prefill_s"] + out["stats"]["decode_s"])
                if tokens is None:
                    tokens = out["token_ids"]
                elif out["token_ids"] != tokens:
                    raise SystemExit(f"{name}: the tokens differ between runs")
        c, w = summarize(cold), summarize(warm)
        results[name] = {"question": question, "images": [Path(p).name for p in images], "cold_s": c, "warm_s": w,
                         "warm_over_cold": w["median"] / c["median"], "generated_tokens": len(tokens),
                         "warm_engine_s": summarize(engine)}
        print(f"{name}: cold {c['median']:.3f} s, warm {w['median']:.3f} s "
              f"({results[name]['warm_over_cold']:.2f}x)", file=sys.stderr)
    return results


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Whole-process `run`, cold vs warm ({s['model']})", "",
             f"{s['repeats']} alternating runs each after one warm-up, `--max-new-tokens {s['max_new_tokens']}`, "
             f"greedy, `--json`; wall time of the whole process (median, p90). Machine: {result['machine']['cpu']}, "
             f"{result['machine']['cores']} cores, load average at start {s['load_average']}.", "",
             "| question | cold (--no-server) | warm (running server) | warm / cold | of warm: the server's "
             "prefill + decode |", "|---|---|---|---|---|"]
    for name, r in result["results"].items():
        lines.append(f"| {name} ({', '.join(r['images']) or 'no image'}) | {r['cold_s']['median']:.3f} s "
                     f"(p90 {r['cold_s']['p90']:.3f}) | {r['warm_s']['median']:.3f} s (p90 {r['warm_s']['p90']:.3f}) "
                     f"| {r['warm_over_cold']:.2f}x | {r['warm_engine_s']['median']:.3f} s |")
    lines += ["", f"Server model load: {s['server_load_s']:.2f} s (paid once, by `serve`). Target (issue 22): warm "
              "text question at most 0.2x of cold.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "warm-run-cpu-small"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    model_dir = str(Path(args.model_dir).resolve())
    state = Path(tempfile.mkdtemp(prefix="warm-run-state-"))
    env = {**os.environ, "PHI3V_ORT_STATE_DIR": str(state), "PYTHONPATH": str(ROOT / "runtime")}
    load = os.getloadavg()[0]
    server = start_server(model_dir, env, state / "serve.log")
    try:
        record = json.loads((state / f"server-{server.pid}.json").read_text())
        results = measure(model_dir, args.repeats, args.max_new_tokens, env)
    finally:
        server.terminate()
        server.wait(timeout=60)
    result = {"settings": {"model": Path(model_dir).name, "repeats": args.repeats,
                           "max_new_tokens": args.max_new_tokens, "server_threads": record["threads"],
                           "server_load_s": record["load_s"], "load_average": round(load, 2),
                           "command": " ".join(sys.argv)},
              "machine": environment(), "results": results}
    write_result(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
