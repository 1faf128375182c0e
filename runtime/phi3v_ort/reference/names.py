"""Checkpoint tensor names and shards, in the release's spelling: the rules shared by the torch reference
(reference/model.py), the exporter (export/) and the LoRA merge (reference/lora.py). Needs no torch."""

from __future__ import annotations

import json
import re
from pathlib import Path

VISION_PREFIX = "model.vision_embed_tokens."
# The real remote code keeps the token embedding inside the image embedding too (`wte`, the same tensor); a
# checkpoint that stores it under that name instead of model.embed_tokens.weight is accepted.
WTE_ALIAS = VISION_PREFIX + "wte.weight"
EMBED_TOKENS = "model.embed_tokens.weight"
# Buffers some transformers versions saved and ours recompute (non-persistent here): safe to drop.
IGNORED_KEYS = re.compile(r"(\.rotary_emb\.inv_freq|\.embeddings\.position_ids)$")
# The CLIP tower's two spellings (transformers <= 4.x with the inner `vision_model`, transformers 5 without).
CLIP_NESTED = VISION_PREFIX + "img_processor.vision_model."
CLIP_FLAT = VISION_PREFIX + "img_processor."
# Keys of a checkpoint saved from the bare Phi3VModel (no "model." prefix): the only prefix difference handled.
BARE_PREFIXES = ("embed_tokens.", "layers.", "norm.", "vision_embed_tokens.")


class CheckpointError(ValueError):
    """The checkpoint folder cannot be loaded into the reference (missing files, keys, or shapes)."""


def shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("model-*-of-*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} has no model.safetensors, model.safetensors.index.json or "
                                  f"model-0000k-of-0000n.safetensors shards")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path} is incomplete: shard(s) {', '.join(missing)} listed in the index are missing")
    return files


def normalise_key(key: str, bare: bool) -> str:
    """A checkpoint name in the release's spelling, with the CLIP tower flat (see the module docstring)."""
    if bare and key.startswith(BARE_PREFIXES):
        key = "model." + key
    if key.startswith(CLIP_NESTED):
        key = CLIP_FLAT + key[len(CLIP_NESTED):]
    return key


def is_bare(names) -> bool:
    """Names saved from the bare Phi3VModel: none under `model.`, some under its own prefixes."""
    names = list(names)
    return not any(n.startswith("model.") for n in names) and any(n.startswith(BARE_PREFIXES) for n in names)
