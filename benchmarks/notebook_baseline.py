#!/usr/bin/env python3
"""The reference notebook's exact recipe as a baseline: transformers remote code, its processor, `generate()`.

Runs only in its own environment (transformers 4.46-4.48, torchvision, network access to the hub); see
benchmarks/README.md. Times the suite's generate scenarios with the same images and writes the same fields:
preprocessing (the notebook's AutoProcessor), time to first token (generate with max_new_tokens=1), decode
tokens/s ((N-1) / (time for N tokens with min_new_tokens=N - time to first token)), peak memory.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from phi3v_ort.bench.common import environment, summarize  # noqa: E402
from phi3v_ort.bench.scenarios import SCENARIOS, render  # noqa: E402
from phi3v_ort.inputs.prompt import build_prompt  # noqa: E402
from phi3v_ort.inputs.prompt import render as render_prompt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="microsoft/Phi-3-vision-128k-instruct")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--scenarios", default="chart,cover,compare,text")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, torch_dtype="auto",
                                                 _attn_implementation="eager").to(args.device).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    results = {}
    for name in args.scenarios.split(","):
        sc = SCENARIOS[name]
        images = [Image.open(io.BytesIO(render(*spec))).convert("RGB") for spec in sc.images] or None
        prompt = render_prompt(build_prompt(sc.question, len(sc.images)))  # the notebook's template, as text
        samples = []
        for rep in range(args.reps + 1):
            t0 = time.perf_counter()
            inputs = processor(prompt, images, return_tensors="pt").to(args.device)
            sync()
            pre = time.perf_counter() - t0
            with torch.inference_mode():
                t1 = time.perf_counter()
                model.generate(**inputs, max_new_tokens=1, do_sample=False, eos_token_id=processor.tokenizer.eos_token_id)
                sync()
                first = time.perf_counter() - t1
                t2 = time.perf_counter()
                model.generate(**inputs, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                               do_sample=False)
                sync()
                full = time.perf_counter() - t2
            if rep:
                samples.append({"preprocess_s": pre, "ttft_s": pre + first,
                                "decode_tps": (args.max_new_tokens - 1) / max(full - first, 1e-9),
                                "prompt_tokens": int(inputs["input_ids"].shape[-1])})
        results[name] = {k: summarize([s[k] for s in samples]) for k in samples[0]}
        print(name, {k: round(statistics.median([s[k] for s in samples]), 4) for k in samples[0]}, file=sys.stderr)
    memory = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({
        "benchmark": "notebook baseline", "command": " ".join(["python", *sys.argv]), "environment": environment(),
        "settings": vars(args), "scenarios": results, "peak_gpu_memory_bytes": memory}, indent=2) + "\n")


if __name__ == "__main__":
    main()
