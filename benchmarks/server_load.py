#!/usr/bin/env python3
"""`phi3v-ort serve` over worker processes: /health latency while every worker prefills, two concurrent image
requests with --workers 1 vs 2, the worker boundary's cost against in-process generation, and turn 2.

    python benchmarks/server_load.py --model-dir models/small-int4-cpu --out benchmarks/results/server-cpu-small

Configurations (same machine, one run, interleaved where it matters):
- in-process: the runtime's own stream() in this process with the default threads (what the server ran before
  worker processes; the reference for "no regression");
- --workers 1 with the default threads (all CPUs for the one model);
- --workers 2 with the CPUs divided (1 thread each on a 2-core machine).
Requests: one 640x400 chart + a question, streaming, max_tokens fixed; time to first token is to the first content
chunk; decode tokens/s is (chunks - 1) / (latency - TTFT). A prober polls /health every 50 ms during every load.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from phi3v_ort.bench.common import chart_image, environment, summarize  # noqa: E402

QUESTION = "Could you please introduce this stock to me?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_dir: str, workers: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "phi3v_ort", "serve", "--model-dir", model_dir, "--port", str(port),
           "--workers", str(workers), "--max-queue", "64"] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(900):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def one_request(url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    first = None
    chunks = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=900) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                chunks += 1
                if first is None:
                    first = time.perf_counter() - t0
    latency = time.perf_counter() - t0
    decode = (chunks - 1) / (latency - first) if first and chunks > 1 and latency > first else float("nan")
    return {"latency_s": latency, "ttft_s": first or float("nan"), "chunks": chunks, "decode_tps": decode}


class HealthProbe:
    """Polls /health every 50 ms in a thread; records each answer's latency and how many workers were busy."""

    def __init__(self, url: str):
        self.url, self.samples, self.busy, self._stop = url, [], [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                r = client.get(self.url + "/health")
                self.samples.append(time.perf_counter() - t0)
                self.busy.append(r.json().get("busy", 0))
                time.sleep(0.05)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, min_busy: int) -> dict:
        during = [s for s, b in zip(self.samples, self.busy) if b >= min_busy]
        return {"polls": len(self.samples), "polls_all_busy": len(during),
                "latency_s": summarize(during) if during else None,
                "p99_s": sorted(during)[max(0, int(len(during) * 0.99) - 1)] if during else None,
                "max_s": max(during) if during else None}


def concurrent(url: str, body: dict, n: int) -> tuple[float, list[dict]]:
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(one_request(url, body))) for _ in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def in_process(model_dir: str, reps: int, max_tokens: int) -> dict:
    """The runtime's stream() in this process (the server's generation path before worker processes)."""
    from phi3v_ort.engine.generation import Finished, stream
    from phi3v_ort.inputs.images import load_image
    from phi3v_ort.engine.model import load_model
    from phi3v_ort.engine.settings import GenerationSettings

    model = load_model(model_dir, "cpu")
    image = load_image("-", stdin=io.BytesIO(chart_image()))
    samples = []
    for k in range(reps + 1):
        done = None
        for event in stream(model, QUESTION, [image], GenerationSettings(max_new_tokens=max_tokens)):
            if isinstance(event, Finished):
                done = event
        if k:
            samples.append({"ttft_s": done.stats.time_to_first_token_s, "decode_tps": done.stats.decode_tokens_per_s})
    return {"threads": model.threads, "ttft_s": summarize([s["ttft_s"] for s in samples]),
            "decode_tps": summarize([s["decode_tps"] for s in samples])}


def turn2(url: str, image_uri: str, reps: int) -> dict:
    reuse, fresh = [], []
    for k in range(reps + 1):
        first = [{"role": "user", "content": [{"type": "text", "text": f"{QUESTION} ({k})"},
                                              {"type": "image_url", "image_url": {"url": image_uri}}]}]
        r = httpx.post(url + "/v1/chat/completions", json={"messages": first, "max_tokens": 8}, timeout=900)
        answer = r.json()["choices"][0]["message"]["content"]
        follow = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And last month?"}]
        a = one_request(url, {"messages": follow, "max_tokens": 4, "stream": True})  # continues the kept generator
        b = one_request(url, {"messages": follow, "max_tokens": 4, "stream": True})  # nothing kept: re-prefill
        if k:
            reuse.append(a["ttft_s"])
            fresh.append(b["ttft_s"])
    return {"reuse_ttft_s": summarize(reuse), "reprefill_ttft_s": summarize(fresh),
            "ratio": statistics.median(reuse) / statistics.median(fresh)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=3, help="Single requests per configuration (after a warm-up).")
    p.add_argument("--pairs", type=int, default=2, help="Two-concurrent-request rounds per configuration.")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    image_uri = "data:image/png;base64," + base64.b64encode(chart_image()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                      {"type": "image_url", "image_url": {"url": image_uri}}]}],
            "max_tokens": args.max_tokens, "stream": True}
    cpus = len(os.sched_getaffinity(0))
    result = {"benchmark": "server_load", "command": " ".join(["python", *sys.argv]), "environment": environment(),
              "settings": vars(args), "cpus": cpus, "configs": []}
    print("in-process ...", file=sys.stderr, flush=True)
    result["in_process"] = in_process(args.model_dir, args.reps, args.max_tokens)
    for workers in (1, 2):
        proc, url = start(args.model_dir, workers, None)
        try:
            threads = httpx.get(url + "/health").json()
            one_request(url, body)  # warm-up
            print(f"--workers {workers}: single requests ...", file=sys.stderr, flush=True)
            singles = []
            with HealthProbe(url) as probe_single:
                for _ in range(args.reps):
                    singles.append(one_request(url, body))
            print(f"--workers {workers}: two at once ...", file=sys.stderr, flush=True)
            walls = []
            with HealthProbe(url) as probe_pair:
                for _ in range(args.pairs):
                    walls.append(concurrent(url, body, 2)[0])
            config = {"workers": workers, "threads_per_worker": max(1, cpus // workers), "health": threads,
                      "single": {"ttft_s": summarize([s["ttft_s"] for s in singles]),
                                 "decode_tps": summarize([s["decode_tps"] for s in singles]),
                                 "latency_s": summarize([s["latency_s"] for s in singles])},
                      "two_concurrent_wall_s": summarize(walls),
                      "health_during_single": probe_single.summary(1),
                      "health_during_pair": probe_pair.summary(workers)}
            if workers == 1:
                print("turn 2 ...", file=sys.stderr, flush=True)
                result["turn2"] = turn2(url, image_uri, 3)
            result["configs"].append(config)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    write(result, Path(args.out), args)


def write(result: dict, out: Path, args) -> None:
    ip, (w1, w2) = result["in_process"], result["configs"]
    lines = [f"# phi3v-ort serve over worker processes on {Path(args.model_dir).name} "
             f"({result['environment']['cpu']}, {result['cpus']} CPUs)", "", f"Command: `{result['command']}`", "",
             f"Requests: one 640x400 chart + a question, streaming, max_tokens {args.max_tokens}; medians "
             f"(p90 in brackets); {args.reps} single requests and {args.pairs} rounds of two concurrent requests per "
             "configuration after a warm-up. The machine is small and shared: compare within this table.", "",
             "| configuration | threads per model | single TTFT s | single decode tok/s | two requests at once: "
             "wall s | /health p50 / p99 / max ms while all workers prefill or decode |",
             "|---|---|---|---|---|---|"]
    lines.append(f"| in-process stream() (the server's path before workers) | {ip['threads']} | "
                 f"{ip['ttft_s']['median']:.2f} ({ip['ttft_s']['p90']:.2f}) | {ip['decode_tps']['median']:.1f} | - | "
                 "- (the event loop was blocked for the whole prefill: 23.9 s measured before) |")
    for c in (w1, w2):
        h = c["health_during_pair"]
        hs = (f"{h['latency_s']['median'] * 1000:.1f} / {h['p99_s'] * 1000:.1f} / {h['max_s'] * 1000:.1f} "
              f"({h['polls_all_busy']} polls)") if h["latency_s"] else "n/a"
        s = c["single"]
        lines.append(f"| --workers {c['workers']} | {c['threads_per_worker']} | {s['ttft_s']['median']:.2f} "
                     f"({s['ttft_s']['p90']:.2f}) | {s['decode_tps']['median']:.1f} | "
                     f"{c['two_concurrent_wall_s']['median']:.2f} | {hs} |")
    ratio_pair = w2["two_concurrent_wall_s"]["median"] / w1["two_concurrent_wall_s"]["median"]
    ttft_ratio = w1["single"]["ttft_s"]["median"] / ip["ttft_s"]["median"]
    decode_ratio = w1["single"]["decode_tps"]["median"] / ip["decode_tps"]["median"]
    lines += ["", f"- Two concurrent image requests: --workers 2 takes {ratio_pair:.2f}x the wall time of --workers 1 "
              "(target <= 0.65x). On 2 cores the work is CPU-bound: two workers with 1 thread each run the two "
              "prefills side by side instead of one after the other with 2 threads each, so the gain is what one "
              "thread per model wins over two threads sharing one model's work.",
              f"- The worker boundary: --workers 1 vs in-process on the same threads: time to first token "
              f"{ttft_ratio:.3f}x, decode {decode_ratio:.3f}x (HTTP, JSON and the pipe included on the server side).",
              f"- /health during a single request (one worker busy): p99 "
              f"{(w1['health_during_single']['p99_s'] or 0) * 1000:.1f} ms."]
    t = result["turn2"]
    lines += ["", "## Turn 2 through the server (one-image conversation, --workers 1)", "",
              f"Time to first token: kept generator {t['reuse_ttft_s']['median'] * 1000:.0f} ms vs re-prefill "
              f"{t['reprefill_ttft_s']['median'] * 1000:.0f} ms ({t['ratio']:.1%})."]
    result["ratios"] = {"two_concurrent_workers2_over_workers1": ratio_pair, "ttft_worker_over_in_process": ttft_ratio,
                        "decode_worker_over_in_process": decode_ratio}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
