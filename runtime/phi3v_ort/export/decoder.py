"""The text decoder: onnxruntime-genai's own model builder, exactly how the release's decoder was made
(`Phi3VForCausalLM`: Phi-3-mini with LongRoPE, exclude_embeds=true), then for the int4 variants int4 RTN block 32
one weight at a time (quantize.py: byte for byte what the builder's own `-p int4` writes, without its 22 GB).

The builder loads a transformers folder with `from_pretrained` (whole, in the dtype the folder's config names), so
it gets a plain Phi-3 folder staged from the checkpoint: config.json for transformers' native Phi3 (the real
`rope_scaling {"type": "su"}` translated, see torch_reference._rope_parameters), the decoder's tensors only --
written a shard's worth at a time, with the adapter merged -- and the tokenizer files.

Memory: the builder holds the decoder in the staged dtype (the checkpoint's, bfloat16 for the real ones: 7.6 GB
for the full model; float32 when an adapter was merged, so the merge is not rounded back to bfloat16) and writes
the float graph a weight at a time; the parent process holds nothing large while it runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from phi3v_ort.package.contract import TOKENIZER_FILES
from phi3v_ort.export.checkpoint import Checkpoint, is_decoder
from phi3v_ort.export.quantize import quantize_int4
from phi3v_ort.export.variants import INT4_BLOCK_SIZE, Variant

FLUSH_BYTES = 1 << 30  # write a staged shard every ~1 GB


class BuilderError(RuntimeError):
    """onnxruntime-genai's model builder failed."""


def stage_decoder(ckpt: Checkpoint, folder: Path, adapter=None) -> torch.dtype:
    """Write the plain-Phi3 folder the builder reads; returns the dtype its weights were written in."""
    dtype = torch.float32 if adapter is not None else ckpt.dtype
    folder.mkdir(parents=True)
    config = ckpt.decoder_config(dtype)
    config.architectures = ["Phi3VForCausalLM"]  # the builder's switch for exclude_embeds and phi3v's layout
    if config.rope_parameters.get("rope_type") == "longrope":
        # the builder reads its magnitude-scale policy from the older key ("su" and "longrope" scale alike)
        config.rope_parameters["type"] = "longrope"
    if (config.sliding_window or 0) >= config.max_position_embeddings:
        config.sliding_window = None  # a window as long as the context never slides (the release has none)
    config.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (ckpt.path / name).is_file():
            shutil.copy(ckpt.path / name, folder / name)

    weight_map: dict[str, str] = {}
    batch: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal batch, size
        if batch:
            from safetensors.torch import save_file

            shard = f"decoder-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(batch, str(folder / shard), metadata={"format": "pt"})
            weight_map.update({k: shard for k in batch})
        batch, size = {}, 0

    for name, tensor in ckpt.iter_tensors(is_decoder):
        if adapter is not None:
            tensor = adapter.merge(name, tensor)
        batch[name] = tensor.to(dtype).contiguous()
        size += batch[name].numel() * batch[name].element_size()
        if size >= FLUSH_BYTES:
            flush()
    flush()
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return dtype


def run_builder(src: Path, variant: Variant, filename: str, work: Path) -> tuple[dict, Path]:
    """Run the builder on the staged folder, in `variant.builder_precision`; returns its genai_config.json and the
    decoder it wrote (float for the int4 variants: `finish_decoder` quantizes it)."""
    build_dir, cache_dir = work / "builder-out", work / "builder-cache"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(build_dir),
           "-p", variant.builder_precision, "-e", variant.provider, "-c", str(cache_dir),
           "--extra_options", "exclude_embeds=true", f"filename={filename}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise BuilderError(f"onnxruntime-genai's model builder failed (exit {proc.returncode}): "
                           f"{lines[-1] if lines else 'no output'}")
    return json.loads((build_dir / "genai_config.json").read_text()), build_dir / filename


def finish_decoder(built: Path, out_dir: Path, variant: Variant) -> None:
    """The builder's decoder into `out_dir` under the same name: quantized for the int4 variants, else moved."""
    if variant.precision == "int4":
        quantize_int4(built, out_dir / built.name, INT4_BLOCK_SIZE, variant.accuracy_level)
        for f in (built, built.with_name(built.name + ".data")):
            f.unlink()
    else:
        for f in (built, built.with_name(built.name + ".data")):
            shutil.move(str(f), str(out_dir / f.name))
