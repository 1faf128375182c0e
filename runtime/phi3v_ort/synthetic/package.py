"""Build a synthetic Phi-3-vision ONNX package: random weights, the published release's exact shape.

Output (`out_dir`) is one variant folder as the release ships it: genai_config.json, processor_config.json,
the tokenizer files and the three ONNX models with their `.onnx.data`. Beside it (`checkpoint_dir`) the same
weights as a transformers-style checkpoint (config.json + model.safetensors, the real checkpoint's names) so a
torch reference can load identical weights.

- decoder: onnxruntime-genai's own model builder (`Phi3VForCausalLM`, exclude_embeds=true) from a random
  transformers `Phi3ForCausalLM` with LongRoPE, exactly how the release's decoder was made;
- vision: `reference.Phi3VImageEmbedding` (transformers' CLIPVisionModel + HD layout + MLP) exported to ONNX;
- embedding: `reference.Phi3VTextEmbedding` sharing the decoder's token embedding, exported to ONNX.

Needs the `build` extra (torch, transformers, onnx, onnxscript, tokenizers, safetensors).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import contract
from .presets import PRESETS, Preset
from .tokenizer import TOKENIZER_FILES, write_tokenizer

PRECISIONS = ("int4", "fp32")
PROVIDERS = ("cpu", "cuda")
NAME_STYLES = {"phi-3": contract.PHI3_FILE_NAMES, "phi-3.5": contract.PHI35_FILE_NAMES}
OPSET = 17


@dataclass(frozen=True)
class BuildOptions:
    preset: str = "tiny"
    precision: str = "int4"
    provider: str = "cpu"
    names: str = "phi-3"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.provider not in PROVIDERS:
            raise ValueError(f"unknown execution provider {self.provider!r}; choose one of {', '.join(PROVIDERS)}")
        if self.names not in NAME_STYLES:
            raise ValueError(f"unknown file-name style {self.names!r}; choose one of {', '.join(NAME_STYLES)}")

    @property
    def io_float16(self) -> bool:
        """The GPU release runs fp16 I/O everywhere; the CPU release fp32."""
        return self.provider == "cuda"


def _log(msg: str) -> None:
    print(f"[make_synthetic_model] {msg}", file=sys.stderr, flush=True)


# -- configs -----------------------------------------------------------------------------------------------------

def longrope_factors(head_size: int) -> tuple[list[float], list[float]]:
    """Deterministic LongRoPE factors shaped like Phi-3's: short near 1, long rising to tens."""
    n = head_size // 2
    short = [1.0 + 0.05 * i / max(n - 1, 1) for i in range(n)]
    long = [1.0 + 63.0 * (i / max(n - 1, 1)) ** 2 for i in range(n)]
    return short, long


def phi3_config(p: Preset):
    from transformers import Phi3Config

    short, long = longrope_factors(p.head_size)
    return Phi3Config(
        vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads,
        max_position_embeddings=p.context_length, original_max_position_embeddings=p.original_context_length,
        rope_parameters={"rope_type": "longrope", "type": "longrope", "rope_theta": 10000.0,
                         "short_factor": short, "long_factor": long},
        rms_norm_eps=1e-5, bos_token_id=contract.BOS_TOKEN_ID, eos_token_id=contract.EOS_TOKEN_ID,
        pad_token_id=contract.PAD_TOKEN_ID, tie_word_embeddings=False, architectures=["Phi3VForCausalLM"],
        initializer_range=0.02,
    )


def clip_config(p: Preset):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=p.clip_hidden_size, intermediate_size=p.clip_intermediate_size,
        num_hidden_layers=p.clip_layers, num_attention_heads=p.clip_heads, image_size=contract.CROP_SIZE,
        patch_size=14, projection_dim=p.clip_hidden_size, hidden_act="quick_gelu", attn_implementation="eager",
    )


# -- weights -----------------------------------------------------------------------------------------------------

def make_modules(p: Preset, seed: int):
    """(decoder, image_embedding, text_embedding), randomly initialised with `seed`. The text embedding shares
    the decoder's embedding matrix."""
    import torch
    from transformers import Phi3ForCausalLM

    from ..reference import Phi3VImageEmbedding, Phi3VTextEmbedding

    torch.manual_seed(seed)
    decoder = Phi3ForCausalLM(phi3_config(p)).eval()
    image = Phi3VImageEmbedding(clip_config(p), p.hidden_size).eval()
    with torch.no_grad():  # the separators start at zero in the real module; give them values worth testing
        image.glb_GN.normal_(0, 0.02)
        image.sub_GN.normal_(0, 0.02)
    text = Phi3VTextEmbedding(p.vocab_size, p.hidden_size).eval()
    text.embed_tokens = decoder.model.embed_tokens
    return decoder, image, text


def checkpoint_state(decoder, image) -> dict:
    """One state dict with the real Phi-3-vision checkpoint's names. transformers 5's CLIPVisionModel has no inner
    `vision_model` module any more; the real checkpoint (saved with transformers 4.x) has it, so it goes back in."""
    state = {k: v for k, v in decoder.state_dict().items()}
    for k, v in image.state_dict().items():
        if k.startswith("img_processor.") and not k.startswith("img_processor.vision_model."):
            k = "img_processor.vision_model." + k[len("img_processor."):]
        state[f"model.vision_embed_tokens.{k}"] = v
    return {k: v.detach().contiguous() for k, v in state.items()}


def write_checkpoint(ckpt_dir: Path, p: Preset, decoder, image) -> None:
    from safetensors.torch import save_file

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint_state(decoder, image), str(ckpt_dir / "model.safetensors"), metadata={"format": "pt"})
    config = decoder.config.to_dict()
    config.update({
        "architectures": ["Phi3VForCausalLM"],
        "model_type": "phi3_v",
        "img_processor": {"image_dim_out": p.clip_hidden_size, "model_name": "openai/clip-vit-large-patch14-336",
                          "name": "clip_vision_model", "num_img_tokens": contract.TOKENS_PER_CROP},
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                       "use_hd_transform": True, "with_learnable_separator": True},
        "vision_config": clip_config(p).to_dict(),
        "synthetic_preset": asdict(p),
    })
    (ckpt_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# -- ONNX exports ------------------------------------------------------------------------------------------------

def _save_onnx(model_proto, path: Path) -> None:
    """Save with all weights in `<name>.data` beside it, as the release does."""
    import onnx

    data = path.name + ".data"
    for stale in (path, path.with_name(data)):
        stale.unlink(missing_ok=True)
    onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=0)


def _export(module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_axes: dict) -> None:
    import onnx
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        with torch.no_grad():
            torch.onnx.export(module, args, str(tmp_path), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False,
                              do_constant_folding=True)
        _save_onnx(onnx.load(str(tmp_path)), path)


def export_vision(image, path: Path, float16: bool) -> None:
    import torch

    module = copy.deepcopy(image).half() if float16 else image
    dtype = torch.float16 if float16 else torch.float32
    pixel_values = torch.randn(2, contract.PIXEL_CROPS, 3, contract.CROP_SIZE, contract.CROP_SIZE, dtype=dtype)
    image_sizes = torch.tensor([[672, 1008], [336, 336]], dtype=torch.int64)
    names = contract.VISION_INPUTS
    out = contract.VISION_OUTPUTS["image_features"]
    _export(module, (pixel_values, image_sizes), path, [names["pixel_values"], names["image_sizes"]], [out],
            {names["pixel_values"]: {0: "num_images"}, names["image_sizes"]: {0: "num_images"},
             out: {0: "num_image_tokens"}})


def export_embedding(text, path: Path, hidden_size: int, float16: bool) -> None:
    import torch

    module = copy.deepcopy(text).half() if float16 else text
    dtype = torch.float16 if float16 else torch.float32
    input_ids = torch.tensor([[1, 32010, -1, -1, -1, 29871, -2, -2, 13]], dtype=torch.int64)
    image_features = torch.randn(5, hidden_size, dtype=dtype)
    names = contract.EMBEDDING_INPUTS
    out = contract.EMBEDDING_OUTPUTS["inputs_embeds"]
    _export(module, (input_ids, image_features), path, [names["input_ids"], names["image_features"]], [out],
            {names["input_ids"]: {0: "batch_size", 1: "sequence_length"},
             names["image_features"]: {0: "num_image_tokens"},
             out: {0: "batch_size", 1: "sequence_length"}})


def build_decoder(src_dir: Path, out_dir: Path, opts: BuildOptions, filename: str) -> dict:
    """Run onnxruntime-genai's model builder on a transformers checkpoint; returns its genai_config.json."""
    build_dir = src_dir.parent / "builder-out"
    cache_dir = src_dir.parent / "builder-cache"
    extra = ["exclude_embeds=true", f"filename={filename}"]
    if opts.precision == "int4":
        extra.append("int4_block_size=32")
        if opts.provider == "cpu":
            extra.append("int4_accuracy_level=4")  # the CPU release is "cpu-int4-rtn-block-32-acc-level-4"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src_dir), "-o", str(build_dir),
           "-p", opts.precision, "-e", opts.provider, "-c", str(cache_dir), "--extra_options", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the model builder failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for name in (filename, filename + ".data"):
        shutil.move(str(build_dir / name), str(out_dir / name))
    return json.loads((build_dir / "genai_config.json").read_text())


# -- package metadata --------------------------------------------------------------------------------------------

def genai_config(built: dict, p: Preset, names: contract.FileNames) -> dict:
    """The release's genai_config.json: the builder's decoder section plus the embedding and vision models."""
    model = built["model"]
    decoder = model["decoder"]
    decoder["filename"] = names.decoder
    decoder["inputs"] = dict(contract.DECODER_INPUTS)
    decoder["outputs"] = dict(contract.DECODER_OUTPUTS)
    session = decoder.setdefault("session_options", {})
    session.setdefault("log_id", "onnxruntime-genai")
    session.setdefault("provider_options", [])
    return {
        "model": {
            "bos_token_id": contract.BOS_TOKEN_ID,
            "context_length": p.context_length,
            "decoder": decoder,
            "embedding": {"filename": names.embedding, "inputs": dict(contract.EMBEDDING_INPUTS),
                          "outputs": dict(contract.EMBEDDING_OUTPUTS)},
            "vision": {"filename": names.vision, "inputs": dict(contract.VISION_INPUTS),
                       "outputs": dict(contract.VISION_OUTPUTS)},
            "eos_token_id": contract.EOS_TOKEN_ID,
            "pad_token_id": contract.PAD_TOKEN_ID,
            "type": contract.MODEL_TYPE,
            "vocab_size": p.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": p.context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
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


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=4) + "\n")


# -- the whole package -------------------------------------------------------------------------------------------

def build_package(out_dir: Path | str, opts: BuildOptions = BuildOptions(),
                  checkpoint_dir: Path | str | None = None) -> Path:
    """Write a synthetic package into `out_dir` (created fresh; an existing folder is replaced only once the new
    one is complete) and its transformers checkpoint into `checkpoint_dir` (default: `<out_dir>.checkpoint`)."""
    out_dir = Path(out_dir).resolve()
    ckpt_dir = Path(checkpoint_dir).resolve() if checkpoint_dir else out_dir.with_name(out_dir.name + ".checkpoint")
    p = PRESETS[opts.preset]
    names = NAME_STYLES[opts.names]
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    work = Path(tempfile.mkdtemp(prefix="phi3v-synthetic-"))
    try:
        _log(f"preset {p.name}: decoder {p.num_layers}x{p.hidden_size}, CLIP {p.clip_layers}x{p.clip_hidden_size}, "
             f"{opts.precision} {opts.provider}, {opts.names} file names")
        decoder, image, text = make_modules(p, opts.seed)
        ckpt_staging = ckpt_dir.with_name(ckpt_dir.name + ".partial")
        shutil.rmtree(ckpt_staging, ignore_errors=True)
        _log(f"checkpoint: {ckpt_dir} ({time.perf_counter() - started:.0f}s)")
        write_checkpoint(ckpt_staging, p, decoder, image)

        # The builder reads a plain Phi3 config and the same safetensors (it ignores the vision weights), so the
        # decoder's weights exist once on disk; the parent drops its copy before the builder loads its own.
        src = work / "hf"
        src.mkdir()
        decoder.config.save_pretrained(src)
        (src / "model.safetensors").symlink_to(ckpt_staging / "model.safetensors")
        write_tokenizer(staging, context_length=p.context_length)
        for name in TOKENIZER_FILES:
            shutil.copy(staging / name, src / name)
        del decoder
        gc.collect()
        _log(f"decoder: running onnxruntime-genai's model builder ({time.perf_counter() - started:.0f}s)")
        built = build_decoder(src, staging, opts, names.decoder)

        _log(f"vision: exporting CLIP + HD layout + projection ({time.perf_counter() - started:.0f}s)")
        export_vision(image, staging / names.vision, opts.io_float16)
        _log(f"embedding: exporting ({time.perf_counter() - started:.0f}s)")
        export_embedding(text, staging / names.embedding, p.hidden_size, opts.io_float16)

        _write_json(staging / "genai_config.json", genai_config(built, p, names))
        _write_json(staging / "processor_config.json", processor_config())

        _replace_dir(ckpt_staging, ckpt_dir)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(ckpt_dir.with_name(ckpt_dir.name + ".partial"), ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _log(f"done in {time.perf_counter() - started:.0f}s: {out_dir}")
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Swap a finished folder into place; the old one is removed only after the new one is there."""
    new.chmod(0o755)  # mkdtemp made it private
    for f in new.iterdir():
        f.chmod(0o644)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
