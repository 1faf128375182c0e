"""The package's side files: genai_config.json (og's "phi3v"), processor_config.json, the tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from phi3v_ort.package import contract
from phi3v_ort.package.contract import TOKENIZER_FILES
from phi3v_ort.export.checkpoint import Checkpoint, tokenizer_source


def end_of_turn_id(ckpt: Checkpoint) -> int:
    """`<|end|>`'s id in the checkpoint's tokenizer (the release's eos_token_id: 32007), else config.json's."""
    tokenizer = json.loads((ckpt.path / "tokenizer.json").read_text())
    for token in tokenizer.get("added_tokens", []):
        if token.get("content") == "<|end|>":
            return int(token["id"])
    eos = ckpt.config.get("eos_token_id", contract.EOS_TOKEN_ID)
    return int(eos[0] if isinstance(eos, list) else eos)


def genai_config(built: dict, ckpt: Checkpoint, names: contract.FileNames) -> dict:
    """The release's genai_config.json: the builder's decoder section plus the embedding and vision models."""
    decoder = built["model"]["decoder"]
    decoder["filename"] = names.decoder
    decoder["inputs"] = dict(contract.DECODER_INPUTS)
    decoder["outputs"] = dict(contract.DECODER_OUTPUTS)
    session = decoder.setdefault("session_options", {})
    session.setdefault("log_id", "onnxruntime-genai")
    session.setdefault("provider_options", [])
    context = int(ckpt.config["max_position_embeddings"])
    return {
        "model": {
            "bos_token_id": int(ckpt.config.get("bos_token_id", contract.BOS_TOKEN_ID)),
            "context_length": context,
            "decoder": decoder,
            "embedding": {"filename": names.embedding, "inputs": dict(contract.EMBEDDING_INPUTS),
                          "outputs": dict(contract.EMBEDDING_OUTPUTS)},
            "vision": {"filename": names.vision, "inputs": dict(contract.VISION_INPUTS),
                       "outputs": dict(contract.VISION_OUTPUTS)},
            "eos_token_id": end_of_turn_id(ckpt),
            "pad_token_id": int(ckpt.config.get("pad_token_id") or contract.PAD_TOKEN_ID),
            "type": contract.MODEL_TYPE,
            "vocab_size": int(ckpt.config["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def processor_config() -> dict:
    def op(name: str, type_: str, attrs: dict | None = None) -> dict:
        body = {"name": name, "domain": "com.microsoft.extensions", "type": type_}
        if attrs:
            body["attrs"] = attrs
        return {"operation": body}

    return {"processor": {"name": "image_processing", "transforms": [
        op("decode_image", "DecodeImage", {"color_space": "BGR"}),
        op("convert_to_rgb", "ConvertRGB"),
        op("phi3_image_transform", "Phi3ImageTransform",
           {"num_crops": contract.MAX_CROPS, "num_img_tokens": contract.TOKENS_PER_CROP}),
    ]}}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=4) + "\n")


def copy_tokenizer(ckpt: Checkpoint, out_dir: Path) -> None:
    """The checkpoint's tokenizer files, their content only (the package's modes are its own)."""
    for name in TOKENIZER_FILES:
        source = tokenizer_source(ckpt.path, name)
        if source is not None:
            shutil.copyfile(source, out_dir / name)
