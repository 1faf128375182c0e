"""The two engines under test, timed at the same boundaries.

Both start from the same input arrays of a scenario (input_ids with -k at image k's positions, pixel_values,
image_sizes), built once by phi3v-ort's pipeline in the harness, so the comparison is about the model, not about
two preprocessors; both run on the same number of intra-op threads. Boundaries (see generation.py):
preprocessing = image loading + input preparation (measured on the phi3v-ort side; the reference reuses its
arrays); time to first token = preprocessing + vision + embedding +
prefill + first token; decode = every later token. Clocks are read after a device synchronisation.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from phi3v_ort.bench.common import rss_bytes
from phi3v_ort.package import contract


def _decoder_bytes(model_dir: Path) -> int:
    """Bytes of the decoder's weights: what one decode step reads (the embedding lookup aside)."""
    import json

    cfg = json.loads((model_dir / "genai_config.json").read_text())
    name = cfg["model"]["decoder"]["filename"]
    return sum(p.stat().st_size for p in (model_dir / name, model_dir / (name + ".data")) if p.exists())


class OrtEngine:
    """phi3v-ort itself: the runtime's stream (its KV-cache plan, og's generator)."""

    name = "phi3v-ort"

    def __init__(self, model_dir: str, device: str, share_buffer: bool = True, cuda_graph: bool = False,
                 threads: int | None = None, processor: str = "own", crops: int | None = None):
        from phi3v_ort.engine.kv_cache import KVCachePolicy
        from phi3v_ort.engine.model import load_model

        t0 = time.perf_counter()
        self.model = load_model(model_dir, device=device, threads=threads,
                                policy=KVCachePolicy(share_buffer=share_buffer, cuda_graph=cuda_graph))
        self.threads = self.model.threads
        self.processor, self.crops = processor, crops
        self.load_s = time.perf_counter() - t0
        self.device = self.model.device
        self.precision = f"onnx package {self.model.info.path.name} ({self.model.info.io_dtype} I/O)"
        self.weight_bytes = _decoder_bytes(self.model.info.path)
        self._vision = None

    def generate(self, question: str, images: list[bytes], max_new_tokens: int) -> dict:
        """One request through the runtime's stream, then (outside its clock) the vision model alone on the same
        pixel_values: og runs vision, embedding and prefill in one call, so the split is measured beside it."""
        import io

        from phi3v_ort.engine.generation import Finished, prepare, stream_prepared
        from phi3v_ort.inputs.images import load_image
        from phi3v_ort.engine.settings import GenerationSettings

        t0 = time.perf_counter()
        loaded = [load_image("-", stdin=io.BytesIO(b)) for b in images]
        settings = GenerationSettings(max_new_tokens=max_new_tokens, ignore_eos=True)
        prepared = prepare(self.model, question, loaded, processor=self.processor, crops=self.crops)
        done = None
        for event in stream_prepared(self.model, prepared, settings):
            if isinstance(event, Finished):
                done = event
        e2e = time.perf_counter() - t0
        s = done.stats
        vision = (self.vision_seconds(prepared.pixel_values, prepared.image_sizes)
                  if prepared.pixel_values is not None else 0.0)
        return {"preprocess_s": s.preprocess_s, "ttft_s": s.time_to_first_token_s, "prefill_s": s.prefill_s,
                "prompt_tokens": s.prompt_tokens, "prefill_tps": s.prefill_tokens_per_s,
                "decode_tps": s.decode_tokens_per_s, "generated": s.generated_tokens, "e2e_s": e2e,
                **split_prefill(s.prefill_s, vision, s.prompt_tokens),
                "crop_slots": int(prepared.pixel_values.shape[1]) if prepared.pixel_values is not None else 0,
                "token_ids": list(done.token_ids)}

    def vision_slots(self, used: int) -> int:
        """Crop slots the runtime feeds for an image that uses `used` (see InputBuilder.slots_for)."""
        return self.model.builder.slots_for(used)

    def vision_seconds(self, pixel_values: np.ndarray, image_sizes: np.ndarray) -> float:
        """The vision model alone, through onnxruntime with the same provider and intra-op threads as og's."""
        import onnxruntime as ort

        if self._vision is None:
            providers = ["CUDAExecutionProvider"] if self.device == "cuda" else ["CPUExecutionProvider"]
            options = ort.SessionOptions()
            if self.threads:
                options.intra_op_num_threads = self.threads
            self._vision = ort.InferenceSession(str(self.model.info.path / self.model.info.files.vision),
                                                options, providers=providers)
            self._vision_dtype = np.float16 if "float16" in self._vision.get_inputs()[0].type else np.float32
        t0 = time.perf_counter()
        self._vision.run(None, {"pixel_values": pixel_values.astype(self._vision_dtype),
                                "image_sizes": image_sizes.astype(np.int64)})
        return time.perf_counter() - t0


def split_prefill(prefill_s: float, vision_s: float, prompt_tokens: int) -> dict:
    """The prompt's time in parts: `vision_s` (the vision model alone, timed beside the request), the rest
    (embedding + decoder prefill + first token) and the prompt's tokens per second over that rest: the decoder's
    prefill speed, which `prefill_tps` (over vision + prefill) is not for an image prompt."""
    rest = max(prefill_s - vision_s, 0.0)
    return {"vision_s": vision_s, "vision_embedding_prefill_s": prefill_s, "prefill_without_vision_s": rest,
            "prefill_without_vision_tps": prompt_tokens / rest if rest > 0 else 0.0}


class TorchEngine:
    """The transformers reference (CLIPVisionModel + HD layout + Phi3ForCausalLM) on the same weights."""

    name = "transformers"

    def __init__(self, checkpoint: str, device: str, dtype: str = "fp32", attn: str = "eager",
                 threads: int | None = None):
        import torch

        from phi3v_ort.reference.model import Phi3VisionReference

        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.torch = torch
        self.device = "cuda" if device == "cuda" else "cpu"
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        t0 = time.perf_counter()
        self.ref = Phi3VisionReference.from_checkpoint(checkpoint, dtype=self.dtype, attn_implementation=attn,
                                                       device=self.device)
        self._sync()
        self.load_s = time.perf_counter() - t0
        self.precision = f"{dtype} ({attn} attention)"
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.ref.decoder.parameters())
        self.weight_bytes -= self.ref.decoder.get_input_embeddings().weight.numel() * \
            self.ref.decoder.get_input_embeddings().weight.element_size()

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def generate(self, inputs: dict, max_new_tokens: int, preprocess_s: float) -> dict:
        from transformers import DynamicCache

        torch = self.torch
        ids = torch.from_numpy(inputs["input_ids"].astype(np.int64)).to(self.device)
        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            feats = None
            if "pixel_values" in inputs:
                pv = torch.from_numpy(inputs["pixel_values"]).to(self.device, self.dtype)
                sizes = torch.from_numpy(inputs["image_sizes"].astype(np.int64)).to(self.device)
                feats = self.ref.image_features(pv, sizes)
                self._sync()
            t_vision = time.perf_counter()
            embeds = self.ref.embed(ids, feats)
            cache = DynamicCache(config=self.ref.decoder.config)  # grows in place (see cache_argument)
            out = self.ref.decoder(inputs_embeds=embeds, use_cache=True, **self.ref.cache_argument(cache))
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens = [int(token)]  # .item() synchronises
            t_first = time.perf_counter()
            for _ in range(max_new_tokens - 1):
                out = self.ref.decoder(input_ids=token, use_cache=True, **self.ref.cache_argument(cache))
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(token))
            t_last = time.perf_counter()
        prefill = t_first - t0
        decode = t_last - t_first
        n = ids.shape[-1]
        return {"preprocess_s": preprocess_s, "ttft_s": preprocess_s + prefill, "prefill_s": prefill,
                "prompt_tokens": int(n), "prefill_tps": n / prefill, "generated": len(tokens),
                "decode_tps": (len(tokens) - 1) / decode if decode > 0 else 0.0,
                "e2e_s": preprocess_s + prefill + decode, **split_prefill(prefill, t_vision - t0, int(n)),
                "token_ids": tokens}

    def vision_slots(self, used: int) -> int:
        """All 17: the reference processor pads every image to num_crops + 1 and the module runs them all."""
        return contract.PIXEL_CROPS

    def vision_seconds(self, pixel_values: np.ndarray, image_sizes: np.ndarray) -> float:
        torch = self.torch
        pv = torch.from_numpy(pixel_values).to(self.device, self.dtype)
        sizes = torch.from_numpy(image_sizes.astype(np.int64)).to(self.device)
        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            self.ref.image_features(pv, sizes)
            self._sync()
        return time.perf_counter() - t0


def peak_memory(device: str) -> dict:
    """This process's peak memory: RSS high-water mark on the CPU; on CUDA also the device memory in use."""
    import resource

    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_bytes": rss_bytes()}
    if device == "cuda":
        import os
        import subprocess

        try:
            rows = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=10).stdout.splitlines()
            mine = [int(r.split(",")[1]) for r in rows if r.split(",")[0].strip() == str(os.getpid())]
            out["gpu_memory_bytes"] = mine[0] * 2**20 if mine else None
        except (OSError, ValueError, subprocess.SubprocessError):
            out["gpu_memory_bytes"] = None
    return out
