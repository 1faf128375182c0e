"""What `phi3v-ort info` reports: what a package is, how it loads here, versions and GPUs. Never downloads."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from phi3v_ort.package.device import gpu_count, resolve_device
from phi3v_ort.package.fetch import hub_cache, locate, model_target, resolve_model_dir
from phi3v_ort.engine.model import load_model

VERSIONED = ("phi3v-ort", "onnxruntime-genai-cuda", "onnxruntime-gpu", "numpy", "pillow", "click", "huggingface-hub")


def environment_lines() -> list[str]:
    """GPUs found and the versions of what phi3v-ort runs on."""
    versions = []
    for dist in VERSIONED:
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    gpus = gpu_count()
    return [f"GPU              {f'{gpus} NVIDIA GPU(s) found' if gpus else 'none found'}",
            f"versions         {', '.join(versions)}"]


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
