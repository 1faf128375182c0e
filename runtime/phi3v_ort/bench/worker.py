"""One engine's measurements, in a process of its own (so its peak memory is its own).

    python -m phi3v_ort.bench.worker CONFIG.json RESULT.json

The harness writes CONFIG (engine, model, scenarios, repetitions, prepared inputs) and reads RESULT.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from phi3v_ort.bench.common import summarize
from phi3v_ort.bench.engines import OrtEngine, TorchEngine, peak_memory
from phi3v_ort.bench.scenarios import SCENARIOS, SWEEP_GRIDS, render


def _repeat(fn, warmup: int, reps: int) -> list:
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(reps)]


def _metrics(samples: list[dict]) -> dict:
    keys = [k for k in samples[0] if isinstance(samples[0][k], (int, float)) and not isinstance(samples[0][k], bool)]
    return {k: summarize([s[k] for s in samples]) for k in keys}


def run_generate(engine, scenario, cfg: dict) -> dict:
    images = [render(*spec) for spec in scenario.images]
    if isinstance(engine, OrtEngine):
        fn = lambda: engine.generate(scenario.question, images, cfg["max_new_tokens"])  # noqa: E731
    else:
        prepared = cfg["prepared"][scenario.name]
        inputs = dict(np.load(prepared["npz"]))
        fn = lambda: engine.generate(inputs, cfg["max_new_tokens"], prepared["preprocess_s"])  # noqa: E731
    samples = _repeat(fn, cfg["warmup"], cfg["reps"])
    tokens = samples[-1].pop("token_ids")
    for s in samples:
        s.pop("token_ids", None)
    return {"metrics": _metrics(samples), "samples": samples, "token_ids": tokens}


def run_vision_sweep(engine, cfg: dict) -> dict:
    """The vision model alone on one image of 1..16 crops, fed the crop slots the engine's pipeline would feed:
    phi3v-ort all of a fixed crop axis or the 1 + crops used of a dynamic one; the reference all 17, as the
    reference processor pads them."""
    rng = np.random.default_rng(0)
    pixel_values = rng.normal(size=(1, 17, 3, 336, 336)).astype(np.float32)
    rows = {}
    for r, c in SWEEP_GRIDS:
        sizes = np.array([[r * 336, c * 336]], dtype=np.int64)
        slots = engine.vision_slots(1 + r * c)
        fed = np.ascontiguousarray(pixel_values[:, :slots])
        times = _repeat(lambda: engine.vision_seconds(fed, sizes), cfg["warmup"], cfg["reps"])
        rows[str(r * c)] = {**summarize(times), "slots": slots}
    return {"crops": rows}


def run_turn2(engine: OrtEngine, scenario, cfg: dict) -> dict:
    from phi3v_ort.engine.conversation import Conversation
    from phi3v_ort.engine.generation import Finished
    from phi3v_ort.inputs.images import load_image
    from phi3v_ort.engine.settings import GenerationSettings
    import io

    image = load_image("-", stdin=io.BytesIO(render(*scenario.images[0])))
    settings = GenerationSettings(max_new_tokens=cfg["max_new_tokens"], ignore_eos=True)
    follow_up = "And how did it move in the last month?"

    def ttft(conv, question, images=()):
        for event in conv.ask(question, images):
            if isinstance(event, Finished):
                return event.stats

    def once():
        conv = Conversation(engine.model, settings, processor=engine.processor, crops=engine.crops)
        ttft(conv, scenario.question, [image])
        reused = ttft(conv, follow_up)
        fresh = Conversation(engine.model, settings, processor=engine.processor, crops=engine.crops)
        fresh.turns = [conv.turns[0]]  # the same transcript, without the kept generator: og's example's way
        again = ttft(fresh, follow_up)
        return {"reuse_ttft_s": reused.time_to_first_token_s, "reprefill_ttft_s": again.time_to_first_token_s,
                "reuse_prompt_tokens": reused.prompt_tokens, "reprefill_prompt_tokens": again.prompt_tokens}

    samples = _repeat(once, cfg["warmup"], cfg["reps"])
    m = _metrics(samples)
    m["ratio_reuse_over_reprefill"] = m["reuse_ttft_s"]["median"] / m["reprefill_ttft_s"]["median"]
    return {"metrics": m, "samples": samples}


def run_batch_scenario(engine: OrtEngine, scenario, cfg: dict) -> dict:
    """Batch items/s through worker processes: one thread vs the default threads (both sequential: each item
    prepared only when the previous one is written), and the default threads with preparation overlapped."""
    from phi3v_ort.batch.runner import Item, run_batch
    from phi3v_ort.inputs.pipeline import make_pipeline
    from phi3v_ort.engine.settings import GenerationSettings
    from phi3v_ort.workers.pool import WorkerPool, WorkerSpec

    tmp = Path(tempfile.mkdtemp(prefix="phi3v-bench-batch-"))
    try:
        items = []
        for k, spec in enumerate(scenario.images):
            path = tmp / f"img{k}.png"
            path.write_bytes(render(*spec, seed=k))
            items.append(Item(f"img{k}", (str(path),), scenario.question))
        settings = GenerationSettings(max_new_tokens=cfg["max_new_tokens"], ignore_eos=True)

        split = {}
        pipeline = make_pipeline(engine.model.builder, cfg.get("processor", "own"), cfg.get("crops"))
        pools = {n: WorkerPool(WorkerSpec(str(engine.model.info.path), engine.device, threads=n), 1).start()
                 for n in sorted({1, engine.threads or 1})}

        def once(threads: int, prefetch: int) -> float:
            out = tmp / f"out-{time.perf_counter_ns()}.jsonl"
            t0 = time.perf_counter()
            run_batch(pools[threads], pipeline, items, out, settings, prepare_threads=2, prefetch=prefetch)
            rate = len(items) / (time.perf_counter() - t0)
            rows = [json.loads(line)["stats"] for line in out.read_text().splitlines()]
            for key in ("preprocess_s", "prefill_s", "decode_s"):  # where the time goes (the last run's split)
                split[key] = sum(r[key] for r in rows)
            return rate

        samples = []
        try:
            for rep in range(cfg["warmup"] + cfg["reps"]):
                row = {"one_thread_sequential_items_per_s": once(1, 0),
                       "sequential_items_per_s": once(engine.threads or 1, 0),
                       "pool_items_per_s": once(engine.threads or 1, 4)}
                if rep >= cfg["warmup"]:
                    samples.append(row)
        finally:
            for pool in pools.values():
                pool.close()
        m = _metrics(samples)
        m["time_split_s"] = dict(split)
        m["threads"] = engine.threads
        m["ratio_pool_over_sequential"] = (m["pool_items_per_s"]["median"] / m["sequential_items_per_s"]["median"])
        m["ratio_threads_over_one"] = (m["sequential_items_per_s"]["median"]
                                       / m["one_thread_sequential_items_per_s"]["median"])
        return {"metrics": m, "samples": samples, "items": len(items)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(config_path: str, result_path: str) -> None:
    # a library's deprecation notes (transformers' FutureWarnings) are for its callers' authors, not for whoever
    # reads a benchmark's progress: the reference's own calls follow the installed transformers (cache_argument)
    warnings.simplefilter("ignore", FutureWarning)
    cfg = json.loads(Path(config_path).read_text())
    if cfg["engine"] == "ort":
        engine = OrtEngine(cfg["model_dir"], cfg["device"], cfg.get("share_buffer", True), cfg.get("cuda_graph", False),
                           cfg.get("threads"), cfg.get("processor", "own"), cfg.get("crops"))
    else:
        engine = TorchEngine(cfg["checkpoint"], cfg["device"], cfg.get("dtype", "fp32"), cfg.get("attn", "eager"),
                             cfg.get("threads"))
    result = {"engine": engine.name, "label": cfg["label"], "precision": engine.precision, "device": engine.device,
              "load_s": engine.load_s, "warm": False, "weight_bytes": engine.weight_bytes, "threads": engine.threads,
              "scenarios": {}}
    for name in cfg["scenarios"]:
        scenario = SCENARIOS[name]
        print(f"[bench] {cfg['label']}: {name}", file=sys.stderr, flush=True)
        if scenario.kind == "generate":
            result["scenarios"][name] = run_generate(engine, scenario, cfg)
        elif scenario.kind == "vision-sweep":
            result["scenarios"][name] = run_vision_sweep(engine, cfg)
        elif scenario.kind == "turn2" and isinstance(engine, OrtEngine):
            result["scenarios"][name] = run_turn2(engine, scenario, cfg)
        elif scenario.kind == "batch" and isinstance(engine, OrtEngine):
            result["scenarios"][name] = run_batch_scenario(engine, scenario, cfg)
    result["memory"] = peak_memory(engine.device)
    Path(result_path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
