"""A Phi-3-vision package on disk: read genai_config.json, check the folder, open its input pipeline (loading it into
onnxruntime-genai is engine/model.py)."""

from __future__ import annotations

import json
import os
from functools import partial
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
    model = _read_config(config_path)
    decoder, embedding, vision = model["decoder"], model.get("embedding"), model.get("vision")

    if vision and contract.LEGACY_VISION_OUTPUT in json.dumps(vision.get("outputs", {})):
        raise Phi3vError(f"{path} is a legacy-format Phi-3-vision package (vision output "
                         f"'{contract.LEGACY_VISION_OUTPUT}') that onnxruntime-genai >= 0.5 cannot run; "
                         f"use {NEW_FORMAT_REPO} instead")
    if model.get("type") != contract.MODEL_TYPE or not vision or not embedding:
        raise Phi3vError(f"{path} holds a model of type {model.get('type')!r}, not a Phi-3-vision package "
                         f"(type {contract.MODEL_TYPE!r} with vision and embedding models)")

    files = contract.FileNames(vision=_file_name(vision, "model.vision", config_path),
                               embedding=_file_name(embedding, "model.embedding", config_path),
                               decoder=_file_name(decoder, "model.decoder", config_path))
    models = (("vision model", files.vision), ("embedding model", files.embedding), ("decoder", files.decoder))
    for role, name in models[:1] if inputs_only else models:
        _fail_if_missing(path / name, role)
        if (path / name).stat().st_size < MIN_MODEL_BYTES:
            raise Phi3vError(f"the model folder {path} is incomplete: {role} {name} is truncated")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        _fail_if_missing(path / name, "file")

    options = decoder.get("session_options", {})
    providers = options.get("provider_options", []) if isinstance(options, dict) else []
    built_for = "cuda" if isinstance(providers, list) and any("cuda" in p for p in providers) else "cpu"
    count = partial(_count, config_path)
    return PackageInfo(
        path=path.resolve(), model_type=model["type"], files=files, built_for=built_for,
        io_dtype="float16" if built_for == "cuda" else "float32",
        num_layers=count(decoder, "model.decoder.num_hidden_layers", MAX_LAYERS),
        hidden_size=count(decoder, "model.decoder.hidden_size", MAX_WIDTH),
        num_heads=count(decoder, "model.decoder.num_attention_heads", MAX_WIDTH),
        num_kv_heads=count(decoder, "model.decoder.num_key_value_heads", MAX_WIDTH),
        head_size=count(decoder, "model.decoder.head_size", MAX_WIDTH),
        context_length=count(model, "model.context_length", MAX_CONTEXT),
        vocab_size=count(model, "model.vocab_size", MAX_VOCAB),
        eos_token_id=_eos(model, config_path),
    )


# Sanity bounds on genai_config.json's numbers, far above any Phi-3-vision (131,072 context, 32 layers, 3072 wide,
# 32,064 tokens): a number past them is a damaged or hostile file, and 2**40 as a context would size buffers.
MAX_CONTEXT = 2**21
MAX_LAYERS = 1024
MAX_WIDTH = 2**16
MAX_VOCAB = 2**22


def _read_config(config_path: Path) -> dict:
    """genai_config.json's `model` section, with its decoder/embedding/vision sections checked to be objects."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except RecursionError:
        raise Phi3vError(f"{config_path} is not a readable onnxruntime-genai config (nested too deeply)") from None
    except (OSError, ValueError) as exc:
        raise Phi3vError(f"{config_path} is not a readable onnxruntime-genai config ({exc})") from None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("decoder"), dict):
        raise Phi3vError(f"{config_path} is not a readable onnxruntime-genai config (no model.decoder object)")
    for section in ("embedding", "vision"):
        if model.get(section) is not None and not isinstance(model[section], dict):
            raise Phi3vError(f"{config_path}: model.{section} must be an object")
    return model


def _count(config_path: Path, section: dict, field: str, most: int) -> int:
    """A positive JSON integer (not a string, not a float) no larger than `most`, or one sentence naming it."""
    value = section.get(field.rsplit(".", 1)[1])
    if value is None:
        raise Phi3vError(f"{config_path} lacks {field}, which the runtime needs")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise Phi3vError(f"{config_path}: {field} must be a whole number from 1 to {most:,}, got "
                         f"{json.dumps(value)[:40]}")
    return value


def _file_name(section: dict, where: str, config_path: Path) -> str:
    """A model file's name: a plain file name inside the package folder (never a path out of it)."""
    name = section.get("filename")
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise Phi3vError(f"{config_path}: {where}.filename must be a file name in the package folder, got "
                         f"{json.dumps(name)[:60]}")
    return name


def _eos(model: dict, config_path: Path) -> int:
    value = model.get("eos_token_id")
    first = value[0] if isinstance(value, list) and value else value
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise Phi3vError(f"{config_path}: model.eos_token_id must be a token id (or a list of them), got "
                         f"{json.dumps(value)[:40]}")
    return first


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
