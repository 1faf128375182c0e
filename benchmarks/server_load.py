#!/usr/bin/env python3
"""Throughput and latency of `phi3v-ort serve` for 1, 2, 4 concurrent clients, --max-concurrency 1 vs 2, and the
turn-2 time to first token with and without the kept generator.

    python benchmarks/server_load.py --model-dir models/small-int4-cpu --out benchmarks/results/server-cpu-small

Each client sends `--requests` streaming requests one after another (one image + a question, fixed length with
EOS ignored is not available through the OpenAI API, so max_tokens bounds it); latency is per request from
send to `[DONE]`, time to first token is to the first content chunk. Loopback only.
"""

from __future__ import annotations

import argparse
import base64
import json
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_dir: str, max_concurrency: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "phi3v_ort", "serve", "--model-dir", model_dir, "--port", str(port),
                             "--max-concurrency", str(max_concurrency), "--max-queue", "64"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
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
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                chunks += 1
                if first is None:
                    first = time.perf_counter() - t0
    return {"latency_s": time.perf_counter() - t0, "ttft_s": first or float("nan"), "chunks": chunks}


def load(url: str, clients: int, requests: int, body: dict) -> dict:
    results, lock = [], threading.Lock()

    def client():
        for _ in range(requests):
            r = one_request(url, body)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(results), "wall_s": wall,
            "requests_per_s": len(results) / wall, "tokens_per_s": sum(r["chunks"] for r in results) / wall,
            "latency_s": summarize([r["latency_s"] for r in results]),
            "ttft_s": summarize([r["ttft_s"] for r in results])}


def turn2(url: str, image_uri: str, reps: int, max_tokens: int) -> dict:
    reuse, fresh = [], []
    for k in range(reps + 1):
        first = [{"role": "user", "content": [{"type": "text", "text": f"Could you please introduce this stock? ({k})"},
                                              {"type": "image_url", "image_url": {"url": image_uri}}]}]
        r = httpx.post(url + "/v1/chat/completions", json={"messages": first, "max_tokens": max_tokens}, timeout=600)
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
    p.add_argument("--requests", type=int, default=3, help="Requests per client.")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    image_uri = "data:image/png;base64," + base64.b64encode(chart_image()).decode()
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Could you please introduce this stock to me?"},
        {"type": "image_url", "image_url": {"url": image_uri}}]}], "max_tokens": args.max_tokens, "stream": True}
    result = {"benchmark": "server_load", "command": " ".join(["python", *sys.argv]), "environment": environment(),
              "settings": vars(args), "runs": []}
    for conc in (1, 2):
        proc, url = start(args.model_dir, conc)
        try:
            one_request(url, body)  # warm-up
            for clients in (1, 2, 4):
                print(f"max-concurrency {conc}, {clients} clients ...", file=sys.stderr, flush=True)
                result["runs"].append({"max_concurrency": conc, **load(url, clients, args.requests, body)})
            if conc == 1:
                result["turn2"] = turn2(url, image_uri, 3, 8)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    lines = [f"# phi3v-ort serve on {Path(args.model_dir).name} ({result['environment']['cpu']}, "
             f"{result['environment']['cores']} cores)", "", f"Command: `{result['command']}`", "",
             f"Each client sends {args.requests} streaming requests (one 640x400 chart, max_tokens {args.max_tokens}).",
             "", "| --max-concurrency | clients | requests/s | tokens/s | latency p50 s | latency p90 s | TTFT p50 s | "
             "TTFT p90 s |", "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['max_concurrency']} | {r['clients']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['latency_s']['median']:.2f} | {r['latency_s']['p90']:.2f} | {r['ttft_s']['median']:.2f} | "
                     f"{r['ttft_s']['p90']:.2f} |")
    t = result["turn2"]
    lines += ["", "## Turn 2 through the server (one-image conversation)", "",
              f"Time to first token: kept generator {t['reuse_ttft_s']['median'] * 1000:.0f} ms vs re-prefill "
              f"{t['reprefill_ttft_s']['median'] * 1000:.0f} ms ({t['ratio']:.1%})."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
