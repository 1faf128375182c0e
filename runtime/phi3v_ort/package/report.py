"""What `phi3v-ort info` reports: what a package is, how it loads here, versions and GPUs. Never downloads."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

from phi3v_ort.package.device import gpu_count, gpu_details, resolve_device
from phi3v_ort.package.fetch import hub_cache, locate, model_target, resolve_model_dir
from phi3v_ort.engine.model import load_model

VERSIONED = ("phi3v-ort", "onnxruntime-genai-cuda", "onnxruntime-gpu", "numpy", "pillow", "click", "huggingface-hub",
             "tokenizers")
# CUDA libraries from PyPI (the `cuda` extra): which ones, and their versions, decide whether CUDA loads
CUDA_WHEELS = ("nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cudnn-cu13", "nvidia-cufft", "nvidia-curand",
               "nvidia-cuda-nvrtc")
# settings that change what runs; a secret's value is never printed, only whether it is set
SHOWN_ENV = ("PHI3V_ORT_MODEL", "PHI3V_ORT_MODELS", "PHI3V_ORT_SERVER", "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH",
             "HF_HUB_CACHE", "HF_HOME", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HTTPS_PROXY", "OMP_NUM_THREADS")
SECRET_ENV = ("HF_TOKEN", "PHI3V_ORT_API_KEY")


def _versions(names: tuple[str, ...], missing: str | None = "(not installed)") -> list[str]:
    found = []
    for dist in names:
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            if missing:
                found.append(f"{dist} {missing}")
    return found


def _runtime_line() -> str:
    try:
        import onnxruntime
        import onnxruntime_genai as og

        providers = ", ".join(p.removesuffix("ExecutionProvider") for p in onnxruntime.get_available_providers())
        return f"providers        {providers}; onnxruntime-genai built with CUDA: {og.is_cuda_available()}"
    except Exception as exc:  # noqa: BLE001 - a report line, whatever went wrong
        return f"providers        could not be read ({type(exc).__name__}: {exc})"


def environment_lines() -> list[str]:
    """Everything a bug report needs about this machine: Python, OS, CPUs, GPUs and driver, versions, CUDA
    libraries, the settings in the environment."""
    gpus = gpu_count()
    driver, names = gpu_details()
    gpu = f"{gpus} NVIDIA GPU(s) found: {', '.join(names)}; driver for CUDA {driver}" if gpus else "none found"
    cuda_wheels = _versions(CUDA_WHEELS, missing=None)
    env = [f"{k}={os.environ[k]}" for k in SHOWN_ENV if os.environ.get(k)]
    env += [f"{k} set" for k in SECRET_ENV if os.environ.get(k)]
    return [f"GPU              {gpu}",
            f"python           {platform.python_version()} ({platform.python_implementation()}) on "
            f"{platform.platform()}, {_usable_cpus()} CPU(s) usable",
            f"versions         {', '.join(_versions(VERSIONED))}",
            _runtime_line(),
            "CUDA from pip    " + (", ".join(cuda_wheels) if cuda_wheels
                                      else "none (a system CUDA 13 + cuDNN 9 is needed for --device cuda)"),
            f"environment      {', '.join(env) if env else 'no phi3v-ort, CUDA or Hugging Face settings'}"]


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def info_lines(model: str | None, model_dir: str | None, device: str, threads: int | None) -> list[str]:
    """The report's lines: a package on disk is loaded and described; a catalog model that is not on disk is
    described with what would be fetched, from where, into which folder."""
    target = model_target(model, model_dir, device)
    folder = target if isinstance(target, Path) else None
    if folder is None:
        local = locate(target)
        if not (local.complete and local.path is not None):
            state = (f"on disk but not usable ({local.problem}): {local.path}" if local.path is not None
                     else "not on this machine")
            return [f"model            {target.label} ({target.note})",
                    f"on disk          {state}",
                    f"would fetch      {target.repo}/{target.folder} into {hub_cache()} (on first use by run, chat, "
                    f"batch or serve, or now with: phi3v-ort fetch -m {target.model} --variant {target.name})",
                    f"device           {resolve_device(device)} (the {target.name} build is chosen for it)",
                    *environment_lines()]
        folder = local.path
    loaded = load_model(resolve_model_dir(None, str(folder), device), device=device, threads=threads)
    i = loaded.info
    return [
        f"model folder     {i.path}",
        f"model type       {i.model_type}",
        f"files            {i.files.vision}, {i.files.embedding}, {i.files.decoder}",
        f"built for        {i.built_for} ({i.io_dtype} I/O)",
        f"loaded on        {loaded.device} (onnxruntime-genai reports {loaded.og_model.device_type})"
        + (f", {loaded.threads} intra-op thread(s) per session" if loaded.threads else ""),
        f"vision input     pixel_values [num_images, {loaded.builder.crop_axis}, 3, 336, 336] "
        f"{loaded.builder.pixel_dtype.__name__}",
        f"decoder          {i.num_layers} layers, hidden {i.hidden_size}, {i.num_heads} heads of {i.head_size}, "
        f"{i.num_kv_heads} KV heads",
        f"context          {i.context_length} tokens, vocab {i.vocab_size}",
        *environment_lines(),
    ]
