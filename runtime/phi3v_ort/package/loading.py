"""A Phi-3-vision package on disk: read genai_config.json, check the folder, open its input pipeline (loading it into
onnxruntime-genai is engine/model.py)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from phi3v_ort.package import contract
from phi3v_ort.errors import Phi3vError

if TYPE_CHECKING:
    from phi3v_ort.inputs.pipeline import InputBuilder

NEW_FORMAT_REPO = "microsoft/Phi-3-vision-128k-instruct-onnx"
MIN_MODEL_BYTES = 1024  # an .onnx smaller than this is a stub or a half-written file


@dataclass(frozen=True)
class PackageInfo:
    """What a package folder declares, read from its genai_config.json (file names included)."""

    path: Path
    model_type: str
    files: contract.FileNames
    built_for: str  # "cuda" or "cpu": the provider the package's config asks for
    io_dtype: str  # "float16" (GPU release) or "float32" (CPU release)
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    context_length: int
    vocab_size: int
    eos_token_id: int

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.io_dtype == "float16" else 4


def _fail_if_missing(path: Path, what: str) -> None:
    if not path.is_file():
        raise Phi3vError(f"the model folder {path.parent} is incomplete: {what} {path.name} is missing")


def read_package(path: str | Path, inputs_only: bool = False) -> PackageInfo:
    """Check a package folder against the release contract without loading any model. `inputs_only`: check only
    what the input pipeline reads (configs, tokenizer, the vision model's graph), as a folder fetched for `prepare`
    holds them."""
    path = Path(path).expanduser()
    if not path.exists():
        raise Phi3vError(f"model folder not found: {path}")
    if not path.is_dir():
        raise Phi3vError(f"--model-dir must be a folder, but {path} is a file")
    config_path = path / "genai_config.json"
    if not config_path.is_file():
        raise Phi3vError(f"{path} is not a Phi-3-vision ONNX package: it has no genai_config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        model = config["model"]
        decoder, embedding, vision = model["decoder"], model.get("embedding"), model.get("vision")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Phi3vError(f"{config_path} is not a readable onnxruntime-genai config ({exc})") from None

    if vision and contract.LEGACY_VISION_OUTPUT in json.dumps(vision.get("outputs", {})):
        raise Phi3vError(f"{path} is a legacy-format Phi-3-vision package (vision output "
                         f"'{contract.LEGACY_VISION_OUTPUT}') that onnxruntime-genai >= 0.5 cannot run; "
                         f"use {NEW_FORMAT_REPO} instead")
    if model.get("type") != contract.MODEL_TYPE or not vision or not embedding:
        raise Phi3vError(f"{path} holds a model of type {model.get('type')!r}, not a Phi-3-vision package "
                         f"(type {contract.MODEL_TYPE!r} with vision and embedding models)")

    files = contract.FileNames(vision=vision["filename"], embedding=embedding["filename"],
                               decoder=decoder["filename"])
    models = (("vision model", files.vision), ("embedding model", files.embedding), ("decoder", files.decoder))
    for role, name in models[:1] if inputs_only else models:
        _fail_if_missing(path / name, role)
        if (path / name).stat().st_size < MIN_MODEL_BYTES:
            raise Phi3vError(f"the model folder {path} is incomplete: {role} {name} is truncated")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        _fail_if_missing(path / name, "file")

    providers = decoder.get("session_options", {}).get("provider_options", [])
    built_for = "cuda" if any("cuda" in p for p in providers) else "cpu"
    try:
        return PackageInfo(
            path=path.resolve(), model_type=model["type"], files=files, built_for=built_for,
            io_dtype="float16" if built_for == "cuda" else "float32",
            num_layers=int(decoder["num_hidden_layers"]), hidden_size=int(decoder["hidden_size"]),
            num_heads=int(decoder["num_attention_heads"]), num_kv_heads=int(decoder["num_key_value_heads"]),
            head_size=int(decoder["head_size"]), context_length=int(model["context_length"]),
            vocab_size=int(model["vocab_size"]), eos_token_id=_first(model["eos_token_id"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise Phi3vError(f"{config_path} lacks a field the runtime needs ({exc})") from None


def _first(value) -> int:
    return int(value[0] if isinstance(value, list) else value)


def default_threads(workers: int = 1) -> int:
    """Intra-op threads per model on the CPU: the CPUs this process may use, shared among the workers.

    og 0.18 runs one intra-op thread here unless told. Measured on the `small` package, 2-core machine: 2 threads
    instead of 1 cut an image prefill from 23.8 s to 12.8 s and lifted decode from 74.7 to 141.5 tokens/s (issue
    11's measurement), and batch items/s 1.85x (benchmarks/results/bench-cpu-small.md). More threads than cores
    only adds contention (two workers with one thread each answer two requests no faster than one worker with two:
    benchmarks/results/server-cpu-small.md), so the default divides the usable CPUs among the worker processes.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, workers))


def open_inputs(info: PackageInfo) -> "InputBuilder":
    """The runtime's input pipeline for a package, without loading any model (imported here: reading a package,
    as `run --server auto` does to find its server, needs no numpy)."""
    from phi3v_ort.inputs.pipeline import InputBuilder

    return InputBuilder(info.path, info.files.vision)
