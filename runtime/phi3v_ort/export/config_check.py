"""A checkpoint's config.json checked field by field before the export builds anything from it.

The reference modules (reference/model.py) read config.json with transformers' config classes, which take nearly
anything and fail later: a `num_hidden_layers` of "2" as a TypeError deep in torch, 0 attention heads as a
ZeroDivisionError, 200,000 layers as minutes of building modules on the meta device before the first check. Here
every field the export reads is a number of the right kind in a sane range, and the verdict is one sentence
naming the field. The bounds sit far above any Phi-3-vision (32 layers, 3072 wide, 32 heads, 32,064 tokens,
131,072 positions) and below what would take the machine down.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from phi3v_ort.reference.names import CheckpointError

# field -> (required, largest value)
DECODER_INTS = {
    "hidden_size": (True, 2**16), "num_hidden_layers": (True, 1024), "num_attention_heads": (True, 1024),
    "num_key_value_heads": (False, 1024), "vocab_size": (True, 2**22), "intermediate_size": (True, 2**20),
    "max_position_embeddings": (True, 2**22), "original_max_position_embeddings": (False, 2**22),
}
VISION_INTS = {"hidden_size": 2**16, "num_hidden_layers": 1024, "num_attention_heads": 1024,
               "intermediate_size": 2**20, "image_size": 2**14, "patch_size": 2**10, "projection_dim": 2**16}
POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta")


def read_config(config_path: Path) -> dict:
    """config.json as a dict, or one sentence: not JSON, nested too deeply, not an object (the fields: check_config)."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except RecursionError:
        raise CheckpointError(f"{config_path} is nested too deeply to be a config.json") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, not {type(config).__name__}")
    return config


def check_config(config: dict, config_path: Path) -> None:
    """Every number the export reads from config.json, in range, before anything is built from it."""
    for field, (required, most) in DECODER_INTS.items():
        if field in config or required:
            whole(config.get(field), f"{config_path}: {field}", most)
    heads, width = config["num_attention_heads"], config["hidden_size"]
    if width % heads:
        raise CheckpointError(f"{config_path}: hidden_size {width} is not a multiple of num_attention_heads {heads}")
    kv = config.get("num_key_value_heads")
    if kv is not None and heads % kv:
        raise CheckpointError(f"{config_path}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                              f"{kv}")
    for field in POSITIVE_FLOATS:
        if field in config:
            positive(config[field], f"{config_path}: {field}")
    _check_sections(config, config_path)


def _check_sections(config: dict, config_path: Path) -> None:
    for section in ("img_processor", "vision_config", "embd_layer", "rope_scaling"):
        if config.get(section) is not None and not isinstance(config[section], dict):
            raise CheckpointError(f"{config_path}: {section} must be an object")
    dim_out = (config.get("img_processor") or {}).get("image_dim_out")
    if dim_out is not None:
        whole(dim_out, f"{config_path}: img_processor.image_dim_out", 2**16)
    for field, most in VISION_INTS.items():
        value = (config.get("vision_config") or {}).get(field)
        if value is not None:
            whole(value, f"{config_path}: vision_config.{field}", most)
    for key in ("short_factor", "long_factor"):
        factors = (config.get("rope_scaling") or {}).get(key)
        if factors is None:
            continue
        if not isinstance(factors, list) or len(factors) > 2**16:
            raise CheckpointError(f"{config_path}: rope_scaling.{key} must be a list of numbers")
        for i, factor in enumerate(factors):
            positive(factor, f"{config_path}: rope_scaling.{key}[{i}]")


def whole(value: object, where: str, most: int) -> int:
    """A JSON whole number from 1 to `most` (not a string, a float or true), or one sentence naming `where`."""
    if value is None:
        raise CheckpointError(f"{where} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise CheckpointError(f"{where} must be a whole number from 1 to {most:,}, got {json.dumps(value)[:40]}")
    return value


def positive(value: object, where: str) -> float:
    """A finite positive JSON number, or one sentence naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{where} must be a finite positive number, got {json.dumps(value)[:40]}")
    return float(value)
