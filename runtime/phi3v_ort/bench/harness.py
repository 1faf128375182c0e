"""`phi3v-ort bench`: prepare inputs once, run each engine in its own process, write JSON + Markdown + PNG.

Each engine runs every scenario with warm-up runs excluded and N repetitions (median and p90 reported), a fixed
generated length (EOS ignored), greedy decoding. The physical limit of decoding is reported next to the measured
rate: memory bandwidth / bytes of decoder weights read per token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phi3v_ort.bench.common import environment
from phi3v_ort.bench.scenarios import DEFAULT_SCENARIOS, SCENARIOS, render

# Datasheet peak memory bandwidths (bytes/s), used when the GPU's cannot be measured here; labelled as such.
DATASHEET_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H200": 4.8e12,
                       "A100-SXM4-80GB": 2.04e12, "A100-SXM4-40GB": 1.56e12, "L4": 3.0e11, "RTX 4090": 1.008e12}


@dataclass
class BenchConfig:
    model_dir: str
    checkpoint: str | None = None
    engines: tuple[str, ...] = ("ort", "torch")
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    device: str = "cpu"
    torch_dtypes: tuple[str, ...] = ("fp32",)
    torch_attn: tuple[str, ...] = ("eager",)
    reps: int = 5
    warmup: int = 1
    max_new_tokens: int = 32
    share_buffer: bool = True
    cuda_graph: bool = False
    out: str = "benchmarks/results/bench"
    threads: int | None = None  # intra-op threads for BOTH engines (og sessions, torch.set_num_threads)
    processor: str = "own"  # how phi3v-ort builds its inputs (the reference engine gets the same arrays)
    crops: int | None = None


def measure_cpu_bandwidth(size_bytes: int = 512 * 2**20, reps: int = 5) -> float:
    """Bytes/s of a large array copy (read + write), best of `reps`: the ceiling for streaming weights."""
    a = np.ones(size_bytes // 8, dtype=np.float64)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip().splitlines()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def bandwidth(device: str) -> dict:
    if device != "cuda":
        return {"bytes_per_s": measure_cpu_bandwidth(), "source": "measured: numpy copy of 512 MiB, best of 5"}
    name = gpu_name() or ""
    for key, value in DATASHEET_BANDWIDTH.items():
        if key.lower() in name.lower():
            return {"bytes_per_s": value, "source": f"datasheet peak for {name}"}
    return {"bytes_per_s": None, "source": f"unknown GPU {name!r}"}


def prepare_inputs(cfg: BenchConfig, workdir: Path) -> dict:
    """The input arrays of every generate scenario, built by phi3v-ort's pipeline (`cfg.processor`, `cfg.crops`;
    the reference engine gets the same arrays) and their preprocessing time (image loading + preparation,
    median of 3)."""
    import io

    from phi3v_ort.engine.generation import prepare
    from phi3v_ort.inputs.images import load_image
    from phi3v_ort.engine.model import load_model

    model = load_model(cfg.model_dir, device="cpu", threads=cfg.threads)
    prepared = {}
    for name in cfg.scenarios:
        scenario = SCENARIOS[name]
        if scenario.kind != "generate":
            continue
        times = []
        for _ in range(3):
            images = [load_image("-", stdin=io.BytesIO(render(*spec))) for spec in scenario.images]
            p = prepare(model, scenario.question, images, processor=cfg.processor, crops=cfg.crops)
            times.append(p.preprocess_s)
        arrays = {"input_ids": np.asarray(p.input_ids).astype(np.int64)}
        if scenario.images:
            arrays["pixel_values"] = reference_padding(np.asarray(p.pixel_values).astype(np.float32), cfg.crops)
            arrays["image_sizes"] = np.asarray(p.image_sizes).astype(np.int64)
        npz = workdir / f"{name}.npz"
        np.savez(npz, **arrays)
        prepared[name] = {"npz": str(npz), "preprocess_s": float(np.median(times)), "prompt_tokens": p.prompt_tokens,
                          "image_tokens": list(p.image_tokens)}
    del model
    return prepared


def reference_padding(pixel_values: np.ndarray, crops: int | None) -> np.ndarray:
    """pixel_values as the reference processor gives them: every image padded with zero crops to num_crops + 1
    slots (phi3v-ort feeds fewer to a vision model whose crop axis is dynamic; the reference runs them all)."""
    from phi3v_ort.package import contract

    slots = (crops or contract.MAX_CROPS) + 1
    if pixel_values.shape[1] >= slots:
        return pixel_values
    pad = np.zeros((pixel_values.shape[0], slots - pixel_values.shape[1], *pixel_values.shape[2:]), pixel_values.dtype)
    return np.concatenate([pixel_values, pad], axis=1)


def engine_runs(cfg: BenchConfig) -> list[dict]:
    runs = []
    if "ort" in cfg.engines:
        runs.append({"engine": "ort", "label": "phi3v-ort"})
    if "torch" in cfg.engines:
        for dtype in cfg.torch_dtypes:
            for attn in cfg.torch_attn:
                runs.append({"engine": "torch", "label": f"transformers {dtype} {attn}", "dtype": dtype, "attn": attn})
    return runs


def run(cfg: BenchConfig) -> dict:
    from phi3v_ort.package.loading import default_threads

    if "torch" in cfg.engines and not cfg.checkpoint:
        cfg.checkpoint = str(Path(cfg.model_dir).resolve()) + ".checkpoint"
    if cfg.threads is None and cfg.device == "cpu":
        cfg.threads = default_threads()  # both engines on the same number of threads
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="phi3v-bench-") as tmp:
        workdir = Path(tmp)
        prepared = prepare_inputs(cfg, workdir)
        results = []
        for run_cfg in engine_runs(cfg):
            config = {**run_cfg, "model_dir": cfg.model_dir, "checkpoint": cfg.checkpoint, "device": cfg.device,
                      "scenarios": [s for s in cfg.scenarios], "reps": cfg.reps, "warmup": cfg.warmup,
                      "max_new_tokens": cfg.max_new_tokens, "prepared": prepared, "share_buffer": cfg.share_buffer,
                      "cuda_graph": cfg.cuda_graph, "threads": cfg.threads, "processor": cfg.processor,
                      "crops": cfg.crops}
            cfg_path, out_path = workdir / f"{run_cfg['label']}.json", workdir / f"{run_cfg['label']}.result.json"
            cfg_path.write_text(json.dumps(config))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                                os.environ.get("PYTHONPATH", "")])}
            proc = subprocess.run([sys.executable, "-m", "phi3v_ort.bench.worker", str(cfg_path), str(out_path)],
                                  env=env)
            if proc.returncode != 0 or not out_path.exists():
                results.append({"label": run_cfg["label"], "error": f"worker exited with {proc.returncode}"})
                continue
            results.append(json.loads(out_path.read_text()))
    result = {"benchmark": "phi3v-ort bench", "started": started, "command": " ".join(sys.argv),
              "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
              "environment": environment(), "gpu": gpu_name() if cfg.device == "cuda" else None,
              "prepared": {k: {kk: vv for kk, vv in v.items() if kk != "npz"} for k, v in prepared.items()},
              "bandwidth": bandwidth(cfg.device), "engines": results}
    result["limits"] = limits(result)
    result["ratios"] = ratios(result)
    return result


def limits(result: dict) -> dict:
    """Decode tokens/s the memory bandwidth allows for each engine's weights (one full read per token)."""
    bw = result["bandwidth"]["bytes_per_s"]
    out = {}
    for e in result["engines"]:
        if "error" in e or not bw:
            continue
        out[e["label"]] = {"weight_bytes": e["weight_bytes"], "decode_limit_tps": bw / e["weight_bytes"]}
    return out


def ratios(result: dict) -> dict:
    """phi3v-ort over each reference run, per generate scenario: decode speed-up and time-to-first-token ratio."""
    engines = [e for e in result["engines"] if "error" not in e]
    ort = next((e for e in engines if e["engine"] == "phi3v-ort"), None)
    out: dict = {}
    if ort is None:
        return out
    for ref in (e for e in engines if e["engine"] != "phi3v-ort"):
        rows = {}
        for name, s in ort["scenarios"].items():
            r = ref["scenarios"].get(name)
            if not r or "metrics" not in s or "decode_tps" not in s["metrics"]:
                continue
            m, n = s["metrics"], r["metrics"]
            rows[name] = {"decode_speedup": m["decode_tps"]["median"] / n["decode_tps"]["median"],
                          "prefill_speedup": n["prefill_s"]["median"] / m["prefill_s"]["median"],
                          "ttft_ratio": m["ttft_s"]["median"] / n["ttft_s"]["median"],
                          "preprocess_share_of_ttft": m["preprocess_s"]["median"] / m["ttft_s"]["median"]}
        if "vision-sweep" in ort["scenarios"] and "vision-sweep" in ref["scenarios"]:
            rows["vision-sweep"] = {c: ref["scenarios"]["vision-sweep"]["crops"][c]["median"] / v["median"]
                                    for c, v in ort["scenarios"]["vision-sweep"]["crops"].items()}
        out[ref["label"]] = rows
    return out


def write(result: dict, out: str) -> list[Path]:
    from phi3v_ort.bench.report import chart, markdown

    base = Path(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = [base.with_suffix(".json"), base.with_suffix(".md")]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text(markdown(result))
    png = chart(result, base.with_suffix(".png"))
    if png:
        paths.append(png)
    return paths

