"""A package loaded into onnxruntime-genai on one device: the og model, its tokenizer and processor, the KV policy."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from phi3v_ort.engine.kv_cache import KVCachePolicy
from phi3v_ort.errors import Phi3vError, SettingError
from phi3v_ort.inputs.pipeline import InputBuilder
from phi3v_ort.package.device import preload_cuda_libraries, resolve_device
from phi3v_ort.package.loading import PackageInfo, default_threads, open_inputs, read_package


# Whether onnxruntime's intra-op threads spin while they wait for work (og passes the flat session-config key
# through: see the release contract). Measured on `small`, 2 threads, 2 cores, spinning off over on
# (benchmarks/results/thread-spinning-cpu-small-quiet.md and -small.md): on a quiet machine decode 0.82x the
# tokens/s (135 -> 111), prefill and an image's time to first token the same; with a CPU hog beside it decode
# 1.56x (53 -> 83; 2.38x at a load of 8-9), prefill 3 % faster. Off by default: it loses a fifth of decode speed
# where nothing else runs and wins half again (or more) where anything does, which on a laptop or a shared box is
# most of the time; PHI3V_ORT_SPINNING=1 turns it on for a machine that runs nothing else.
ALLOW_SPINNING = False
SPINNING_ENV = "PHI3V_ORT_SPINNING"


def default_spinning() -> bool:
    """ALLOW_SPINNING, unless $PHI3V_ORT_SPINNING says 1 or 0 (worker processes inherit it)."""
    value = os.environ.get(SPINNING_ENV, "").strip()
    if not value:
        return ALLOW_SPINNING
    if value not in ("0", "1"):
        raise SettingError(f"${SPINNING_ENV} must be 1 (spin) or 0 (do not), got {value!r}")
    return value == "1"


def thread_overlay(threads: int, spinning: bool = ALLOW_SPINNING) -> str:
    """og's config overlay setting intra_op_num_threads and intra-op spinning for the vision, embedding and
    decoder sessions."""
    options = {"session_options": {"intra_op_num_threads": int(threads),
                                   "session.intra_op.allow_spinning": "1" if spinning else "0"}}
    return json.dumps({"model": {"decoder": options, "embedding": options, "vision": options}})


@dataclass
class LoadedModel:
    """A package opened on one device: the og model, its tokenizer and processor, and the runtime's own input
    pipeline (inputs.InputBuilder)."""

    info: PackageInfo
    device: str  # "cuda" or "cpu"
    policy: KVCachePolicy
    og_model: object
    tokenizer: object
    processor: object
    builder: InputBuilder
    threads: int | None = None  # intra-op threads per session on the CPU (None: og's own default)
    load_s: float | None = None  # how long load_model took (og's model, tokenizer and processor)
    warm: bool = False  # loaded before the request that is being answered (a running server's model)

    @property
    def cuda_graph(self) -> bool:
        return self.device == "cuda" and self.policy.cuda_graph


def load_model(path: str | Path, device: str = "auto", policy: KVCachePolicy = KVCachePolicy(),
               threads: int | None = None, spinning: bool | None = None) -> LoadedModel:
    """Load a package on `device` ('auto' picks CUDA only when a GPU is really there) with a KV-cache policy and,
    on the CPU, `threads` intra-op threads per session (default: default_threads()) that spin while they wait
    or not (default: default_spinning())."""
    import onnxruntime_genai as og

    started = time.perf_counter()
    info = read_package(path)
    builder = open_inputs(info)
    resolved = resolve_device(device)
    if resolved == "cuda":
        preload_cuda_libraries()
    if threads is not None and threads < 1:
        raise Phi3vError(f"--threads must be at least 1, got {threads}")
    threads = (threads or default_threads()) if resolved == "cpu" else threads
    config = og.Config(str(info.path))
    if threads:
        config.overlay(thread_overlay(threads, default_spinning() if spinning is None else spinning))
    config.clear_providers()
    if resolved == "cuda":
        config.append_provider("cuda")
        config.set_provider_option("cuda", "enable_cuda_graph", "1" if policy.cuda_graph else "0")
    try:
        model = og.Model(config)
        tokenizer = og.Tokenizer(model)
        processor = model.create_multimodal_processor()
    except RuntimeError as exc:
        raise Phi3vError(f"onnxruntime-genai could not load {info.path} on {resolved}: "
                         f"{str(exc).strip().splitlines()[0]}") from None
    return LoadedModel(info=info, device=resolved, policy=policy, og_model=model, tokenizer=tokenizer,
                       processor=processor, builder=builder, threads=threads,
                       load_s=time.perf_counter() - started)
