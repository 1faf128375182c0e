"""A randomly initialised Phi-3-vision checkpoint in the real published layout, written shard by shard.

What microsoft/Phi-3-vision-128k-instruct (family "phi-3") and microsoft/Phi-3.5-vision-instruct ("phi-3.5") put
in their folders, minus the remote code: config.json with their fields (`rope_scaling` as they spell it, top-level
`rope_theta`, `img_processor`, `embd_layer`, flash-attention and bfloat16 labels), bfloat16 tensors under their
names (the CLIP tower nested as transformers 4.x saved it: `...img_processor.vision_model.*`) split into
`model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`, and the tokenizer files.

One addition, only where the real layout has no way to say it: a preset whose CLIP tower is not ViT-L/14-336
(every preset but `full`) records its dims in `vision_config`, which the torch reference and the exporter read.

The tensor list comes from export.checkpoint.expected_tensors (the same list the exporter checks against). Each
tensor's values depend only on the seed and its name, never on the shard order: N(0, 0.02), layer-norm weights
1 + N(0, 0.02). Memory: one shard at a time, so the `full` preset (4.2 B parameters, 8.3 GB) needs ~5 GB.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from phi3v_ort.package import contract
from phi3v_ort.export.checkpoint import expected_tensors
from phi3v_ort.reference.model import CLIP_VIT_L_14_336
from phi3v_ort.reference.names import CLIP_FLAT, CLIP_NESTED
from phi3v_ort.synthetic.presets import Preset
from phi3v_ort.synthetic.tokenizer import write_tokenizer

FAMILY_NAMES = {"phi-3": "Phi-3-vision-128k-instruct", "phi-3.5": "Phi-3.5-vision-instruct"}
# Phi-3-vision's config.json says "su"; Phi-3.5's "longrope" (the same scaling under its later name).
FAMILY_ROPE_TYPE = {"phi-3": "su", "phi-3.5": "longrope"}
CLIP_DIMS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
INIT_STD = 0.02


def longrope_factors(head_size: int) -> tuple[list[float], list[float]]:
    """Deterministic LongRoPE factors shaped like Phi-3's: short near 1, long rising to tens."""
    n = head_size // 2
    short = [1.0 + 0.05 * i / max(n - 1, 1) for i in range(n)]
    long = [1.0 + 63.0 * (i / max(n - 1, 1)) ** 2 for i in range(n)]
    return short, long


def checkpoint_config(p: Preset, family: str) -> dict:
    """config.json as the family's repository writes it, for preset `p`."""
    short, long = longrope_factors(p.head_size)
    config = {
        "_name_or_path": FAMILY_NAMES[family],
        "architectures": ["Phi3VForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                     "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"},
        "bos_token_id": contract.BOS_TOKEN_ID,
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                       "use_hd_transform": True, "with_learnable_separator": True},
        "embd_pdrop": 0.0,
        "eos_token_id": 2,  # the real config.json names </s>; <|end|> comes from the tokenizer
        "hidden_act": "silu",
        "hidden_size": p.hidden_size,
        "img_processor": {"image_dim_out": p.clip_hidden_size, "model_name": "openai/clip-vit-large-patch14-336",
                          "name": "clip_vision_model", "num_img_tokens": contract.TOKENS_PER_CROP},
        "initializer_range": INIT_STD,
        "intermediate_size": p.intermediate_size,
        "max_position_embeddings": p.context_length,
        "model_type": "phi3_v",
        "num_attention_heads": p.num_heads,
        "num_hidden_layers": p.num_layers,
        "num_key_value_heads": p.num_kv_heads,
        "original_max_position_embeddings": p.original_context_length,
        "pad_token_id": contract.PAD_TOKEN_ID,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {"long_factor": long, "short_factor": short, "type": FAMILY_ROPE_TYPE[family]},
        "rope_theta": 10000.0,
        "sliding_window": p.context_length,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.38.1",
        "use_cache": True,
        "vocab_size": p.vocab_size,
        "_attn_implementation": "flash_attention_2",
    }
    clip = {"hidden_size": p.clip_hidden_size, "intermediate_size": p.clip_intermediate_size,
            "num_hidden_layers": p.clip_layers, "num_attention_heads": p.clip_heads}
    if any(clip[k] != CLIP_VIT_L_14_336[k] for k in CLIP_DIMS):
        config["vision_config"] = {**CLIP_VIT_L_14_336, **clip, "projection_dim": p.clip_hidden_size}
    return config


def stored_name(canonical: str) -> str:
    """The real checkpoint's spelling: the CLIP tower under `img_processor.vision_model.`."""
    if canonical.startswith(CLIP_FLAT) and not canonical.startswith(CLIP_NESTED):
        return CLIP_NESTED + canonical[len(CLIP_FLAT):]
    return canonical


def random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype):
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    values = torch.randn(shape, generator=gen, dtype=torch.float32) * INIT_STD
    leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
    if "norm" in leaf or "layrnorm" in leaf:  # RMSNorm / LayerNorm scales sit near 1
        values += 1.0
    return values.to(dtype)


def write_random_checkpoint(out: Path, p: Preset, family: str = "phi-3", seed: int = 0, shards: int = 2,
                            log=lambda msg: None) -> Path:
    """Write the checkpoint folder `out` (created; must not exist or be empty)."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = checkpoint_config(p, family)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(out, context_length=p.context_length)

    shapes = expected_tensors(config)
    names = sorted(shapes, key=stored_name)
    sizes = {n: 2 * _numel(shapes[n]) for n in names}  # bfloat16
    total = sum(sizes.values())
    # contiguous runs of names balanced by bytes (as save_pretrained's max_shard_size splits them)
    parts: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for n in names:
        parts[min(shards - 1, int((done + sizes[n] / 2) * shards / total))].append(n)
        done += sizes[n]
    weight_map: dict[str, str] = {}
    for k, part in enumerate(parts):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        log(f"checkpoint shard {k + 1}/{shards}: {len(part)} tensors, {sum(sizes[n] for n in part) / 1e9:.2f} GB")
        tensors = {stored_name(n): random_tensor(n, shapes[n], seed, torch.bfloat16) for n in part}
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
