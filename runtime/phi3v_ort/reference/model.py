"""The transformers-side reference of Phi-3-vision, built only from transformers' native classes (no remote code).

    vision  = reference.Phi3VImageEmbedding   (transformers' CLIPVisionModel + Phi-3-V HD layout + MLP projection)
    decoder = transformers.Phi3ForCausalLM    (fed `inputs_embeds`: image features at the negative-id positions)

It loads either a synthetic package's checkpoint (`<package>.checkpoint/`: config.json with model_type "phi3_v", a
full decoder config and `vision_config`) or the real `microsoft/Phi-3-vision-128k-instruct` folder (config.json with
`rope_scaling: {"type": "su", ...}`, `img_processor` and no `vision_config`; weights in one `model.safetensors` or
sharded with `model.safetensors.index.json`). Both use the release's tensor names, which are this module's own:

    model.embed_tokens.weight, model.layers.N...., model.norm.weight, lm_head.weight   -> decoder (Phi3ForCausalLM)
    model.vision_embed_tokens.<name>                                                 -> vision, as <name>

with one explicit exception: the CLIP tower. The real checkpoint (saved by transformers 4.38) names it
`model.vision_embed_tokens.img_processor.vision_model.<...>`; transformers 5's CLIPVisionModel dropped that inner
`vision_model` module (its own loader strips the prefix: `PrefixChange(prefix_to_remove="vision_model")`), so a
checkpoint saved from these modules on transformers 5 -- every synthetic one -- says `...img_processor.<...>`.
Both spellings load, into whichever the installed CLIPVisionModel uses.

Its inputs are the tensors onnxruntime-genai's multimodal processor makes (`input_ids` with -k at image k's
positions, `pixel_values` [N, 17, 3, 336, 336], `image_sizes` [N, 2]), so both engines see exactly the same
preprocessed pixels and token ids.

CLIP config. The real config.json names its vision tower only by `img_processor.model_name`
("openai/clip-vit-large-patch14-336"); the config is then CLIP ViT-L/14-336's (`CLIP_VIT_L_14_336`, as Phi-3-V's own
remote code hard-codes it). A checkpoint with other CLIP dims (e.g. a synthetic model written in the real layout)
must say so explicitly with `from_checkpoint(..., clip_config=...)`: a `CLIPVisionConfig`, or a dict of overrides
applied on top of the checkpoint's `vision_config` / ViT-L/14-336. The dims are not guessed from the weights (the
head count cannot be read from any shape); they are checked against every weight's shape, with a clear error.

Requires torch, transformers and safetensors (the `build` extra). The runtime never imports this module.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import CLIPVisionConfig, Phi3Config, Phi3ForCausalLM

from phi3v_ort.package import contract
from phi3v_ort.reference.modules import Phi3VImageEmbedding, Phi3VTextEmbedding
from phi3v_ort.reference.names import (EMBED_TOKENS, IGNORED_KEYS, VISION_PREFIX,
                                       WTE_ALIAS, CheckpointError, is_bare, normalise_key, shard_files)

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")

# CLIP ViT-L/14-336 as Phi-3-V's image_embedding_phi3_v.py defines it (CLIP_VIT_LARGE_PATCH14_336_CONFIG).
CLIP_VIT_L_14_336: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 336, "patch_size": 14, "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
    "projection_dim": 768,
}
KNOWN_CLIP_MODELS = {"openai/clip-vit-large-patch14-336": CLIP_VIT_L_14_336}

# config.json keys that are Phi-3-V's own (vision tower, remote code, bookkeeping), not Phi3Config's.
NON_DECODER_KEYS = {
    "model_type", "architectures", "auto_map", "img_processor", "embd_layer", "vision_config", "synthetic_preset",
    "_attn_implementation", "attn_implementation", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "rope_scaling", "rope_parameters", "rope_theta", "quantization_config",
}


# -- config ------------------------------------------------------------------------------------------------------

def _rope_parameters(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Phi3Config's `rope_parameters` from either layout: the real `rope_scaling: {"type": "su"|"longrope", ...}`
    + top-level `rope_theta`, or a saved transformers 5 `rope_parameters`.

    transformers 5.23's Phi3Config rejects the real config's `{"type": "su"}` as is (it renames su to longrope only
    after moving `original_max_position_embeddings` into the rope dict, so validation then misses that key), hence
    the explicit translation here. "su" and "longrope" are the same scaling; onnxruntime-genai's builder treats
    them alike too (same sqrt(1 + ln(s) / ln(original)) magnitude scale).
    """
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
    if kind in ("su", "longrope") and "short_factor" in rope:
        original = int(cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings"))
        max_pos = int(cfg["max_position_embeddings"])
        rope.update(rope_type="longrope", rope_theta=float(theta), original_max_position_embeddings=original)
        # The same ratio transformers derives itself when `factor` is absent; given explicitly it stays silent.
        rope.setdefault("factor", max_pos / original)
        return rope
    if kind == "default":
        return {"rope_type": "default", "rope_theta": float(theta)}
    raise CheckpointError(f"unsupported rope scaling {kind!r} for a Phi-3 decoder (expected 'su' or 'longrope')")


def decoder_config(cfg: Mapping[str, Any], dtype: torch.dtype, attn_implementation: str) -> Phi3Config:
    """Phi3Config from a phi3_v config.json (real or synthetic)."""
    fields = set(Phi3Config.__dataclass_fields__)
    kwargs = {k: v for k, v in cfg.items() if k in fields and k not in NON_DECODER_KEYS}
    for required in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                     "intermediate_size", "max_position_embeddings"):
        if required not in kwargs:
            raise CheckpointError(f"config.json lacks the decoder field {required!r}")
    config = Phi3Config(**kwargs, rope_parameters=_rope_parameters(cfg))
    config.architectures = ["Phi3ForCausalLM"]
    config.dtype = dtype
    config._attn_implementation = attn_implementation
    return config


def vision_config(cfg: Mapping[str, Any], override: CLIPVisionConfig | Mapping[str, Any] | None,
                  attn_implementation: str) -> CLIPVisionConfig:
    """The CLIP config: an explicit CLIPVisionConfig wins; else config.json's `vision_config` (synthetic
    checkpoints), else the model named by `img_processor.model_name` (the real checkpoint: ViT-L/14-336); a dict
    `override` is applied on top of either."""
    if isinstance(override, CLIPVisionConfig):
        clip = CLIPVisionConfig.from_dict(override.to_dict())
    else:
        if cfg.get("vision_config"):
            base = dict(cfg["vision_config"])
        else:
            name = (cfg.get("img_processor") or {}).get("model_name")
            if name not in KNOWN_CLIP_MODELS:
                raise CheckpointError(
                    f"config.json has no vision_config and its img_processor.model_name {name!r} is not one of "
                    f"{sorted(KNOWN_CLIP_MODELS)}; pass clip_config= explicitly")
            base = dict(KNOWN_CLIP_MODELS[name])
        base.update(dict(override or {}))
        for drop in ("_attn_implementation", "attn_implementation", "transformers_version", "model_type",
                     "architectures", "dtype", "torch_dtype"):
            base.pop(drop, None)
        clip = CLIPVisionConfig(**base)
    dim_out = (cfg.get("img_processor") or {}).get("image_dim_out")
    if dim_out is not None and int(dim_out) != clip.hidden_size:
        raise CheckpointError(f"config.json's img_processor.image_dim_out is {dim_out} but the CLIP config's "
                              f"hidden_size is {clip.hidden_size}; pass a matching clip_config=")
    clip._attn_implementation = attn_implementation
    return clip


# -- weights -----------------------------------------------------------------------------------------------------

def iter_checkpoint(path: Path) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(normalised name, name as stored, tensor) for every tensor of the checkpoint, shard by shard (one shard in
    memory at a time)."""
    from safetensors import safe_open

    files = shard_files(path)
    with safe_open(str(files[0]), framework="pt") as f:
        bare = is_bare(list(f.keys()))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield normalise_key(key, bare), key, f.get_tensor(key)


def vision_targets(vision: nn.Module) -> dict[str, torch.Tensor]:
    """Normalised release name (`normalise_key`) -> the vision module's parameter/persistent buffer it fills."""
    return {normalise_key(VISION_PREFIX + k, False): v for k, v in vision.state_dict(keep_vars=True).items()}


def parameter_targets(decoder: nn.Module, vision: nn.Module) -> dict[str, torch.Tensor]:
    """Normalised release name (`normalise_key`) -> the parameter/persistent buffer it fills."""
    return {**decoder.state_dict(keep_vars=True), **vision_targets(vision)}


def load_weights(path: Path, decoder: nn.Module, vision: nn.Module) -> None:
    """Copy the checkpoint's tensors into the modules; fail listing every missing, unexpected or misshapen key."""
    targets = parameter_targets(decoder, vision)
    filled: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    wte: torch.Tensor | None = None
    with torch.no_grad():
        for key, stored, tensor in iter_checkpoint(path):
            if key == WTE_ALIAS:
                wte = tensor
                continue
            if IGNORED_KEYS.search(key):
                continue
            target = targets.get(key)
            if target is None:
                unexpected.append(stored)
                continue
            if key in filled:
                unexpected.append(f"{stored} (a second copy of {key})")
                continue
            if tuple(target.shape) != tuple(tensor.shape):
                mismatched.append(f"{stored}: checkpoint {tuple(tensor.shape)}, model {tuple(target.shape)}")
                continue
            target.copy_(tensor)
            filled.add(key)
        if EMBED_TOKENS not in filled and wte is not None and EMBED_TOKENS in targets:
            if tuple(wte.shape) == tuple(targets[EMBED_TOKENS].shape):
                targets[EMBED_TOKENS].copy_(wte)
                filled.add(EMBED_TOKENS)
    missing = sorted(set(targets) - filled)
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es) (is the CLIP/decoder config right? a checkpoint "
                         f"whose CLIP is not ViT-L/14-336 needs clip_config=):\n  " + "\n  ".join(mismatched[:20]))
        if missing:
            parts.append(f"{len(missing)} missing key(s):\n  " + "\n  ".join(missing[:40]))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s):\n  " + "\n  ".join(sorted(unexpected)[:40]))
        raise CheckpointError(f"cannot load {path} into Phi3ForCausalLM + Phi3VImageEmbedding:\n" + "\n".join(parts))


@contextmanager
def construction(dtype: torch.dtype, device: str | torch.device):
    """Build modules directly in `dtype` on `device`, skipping random init (every weight is overwritten)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older/newer transformers: plain (slower) random init
        no_init_weights = None
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if no_init_weights is None:
                yield
            else:
                with no_init_weights():
                    yield
    finally:
        torch.set_default_dtype(previous)


@dataclass
class GreedyTrace:
    """What `Phi3VisionReference.greedy_steps` returns."""

    tokens: list[int]  # the new tokens (an end token, if one stopped generation, included)
    step_logits: torch.Tensor  # [len(tokens), vocab] float32: the logits each token was picked from
    prefill_logits: torch.Tensor | None = None  # [prompt length, vocab] float32, with keep_prefill_logits


# -- the reference -----------------------------------------------------------------------------------------------

class Phi3VisionReference(nn.Module):
    """Phi-3-vision from transformers' native pieces: `vision` (Phi3VImageEmbedding) + `decoder` (Phi3ForCausalLM).

    Batch size 1 (the shape og's processor gives one request). All methods run under torch.no_grad().
    """

    def __init__(self, vision: Phi3VImageEmbedding, decoder: Phi3ForCausalLM,
                 eos_token_ids: Sequence[int] = ()):
        super().__init__()
        self.vision = vision
        self.decoder = decoder
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        # The text embedding shares the decoder's token embedding (as Phi-3-V's does); built on meta, then shared.
        with torch.device("meta"):
            text = Phi3VTextEmbedding(1, 1)
        text.embed_tokens = decoder.get_input_embeddings()
        self._text = [text]  # a list: not registered twice as a submodule

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        attn_implementation: str = "eager", device: str | torch.device = "cpu",
                        clip_config: CLIPVisionConfig | Mapping[str, Any] | None = None) -> Phi3VisionReference:
        """Load a synthetic `<package>.checkpoint` folder or the real microsoft/Phi-3-vision-128k-instruct folder.

        `clip_config`: see the module docstring (needed only when the CLIP tower is neither described by the
        config's `vision_config` nor ViT-L/14-336)."""
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
        path = Path(path).expanduser()
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path} is not a checkpoint folder: it has no config.json")
        cfg = json.loads(config_path.read_text())
        if cfg.get("model_type") != "phi3_v":
            raise CheckpointError(f"{config_path} has model_type {cfg.get('model_type')!r}, not 'phi3_v'")
        dec_cfg = decoder_config(cfg, dtype, attn_implementation)
        clip_cfg = vision_config(cfg, clip_config, attn_implementation)
        with construction(dtype, device):
            decoder = Phi3ForCausalLM(dec_cfg)
            vision = Phi3VImageEmbedding(clip_cfg, dec_cfg.hidden_size)
        load_weights(path, decoder, vision)
        # Non-persistent buffers are recomputed, not loaded: make sure they are on the right device.
        decoder.to(device).eval()
        vision.to(device).eval()
        return cls(vision, decoder, eos_token_ids=_eos_ids(cfg, path))

    def apply_adapter(self, path: str | Path) -> Phi3VisionReference:
        """Apply a PEFT LoRA adapter folder in place, with peft itself (the oracle of the exporter's own merge,
        `reference.lora`), and return self: afterwards `decoder` and `vision` compute the adapted model.

        peft injects into a throwaway module whose names spell the checkpoint's (`model.layers...`,
        `model.vision_embed_tokens...`, `lm_head`) over this reference's own submodules, so the LoRA layers it
        puts on their parents are the ones this reference's forward runs. The adapter's keys are parsed and
        checked (refusals included) by `reference.lora.LoraAdapter.open`; per-module rank and alpha are resolved
        with peft's `get_pattern_key` on the names the adapter was trained with and handed to peft as exact names.
        Missing or unexpected adapter keys are an error.
        """
        import dataclasses

        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from peft.utils.other import get_pattern_key

        from phi3v_ort.reference.lora import AdapterError, LoraAdapter

        if getattr(self, "_adapter_path", None) is not None:
            raise ValueError(f"an adapter ({self._adapter_path}) is already applied to this reference")
        adapter = LoraAdapter.open(path)
        decoder = self.decoder.model
        mirror = nn.Module()
        mirror.model = nn.Module()
        for name in ("embed_tokens", "layers", "norm"):
            setattr(mirror.model, name, getattr(decoder, name))
        mirror.model.vision_embed_tokens = self.vision
        mirror.lm_head = self.decoder.lm_head
        modules = {normalise_key(n, False): n for n, _ in mirror.named_modules() if n}

        config = LoraConfig.from_pretrained(str(adapter.path))
        state: dict[str, torch.Tensor] = {}
        targets: list[str] = []
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        for name, module in adapter.modules.items():
            target = modules.get(name.removesuffix(".weight"))
            if target is None:
                raise AdapterError(f"the adapter {adapter.path} targets {name}, which the reference does not have")
            targets.append(target)
            state[f"{target}.lora_A.weight"] = module.lora_A
            state[f"{target}.lora_B.weight"] = module.lora_B
            # peft matches the patterns against the module's name at training time, which may be spelled
            # differently from the mirror's (nested CLIP, bare prefixes): resolve them there, pass exact names.
            r_key = get_pattern_key((config.rank_pattern or {}).keys(), module.source)
            alpha_key = get_pattern_key((config.alpha_pattern or {}).keys(), module.source)
            ranks[re.escape(target)] = (config.rank_pattern or {}).get(r_key, config.r)
            alphas[re.escape(target)] = (config.alpha_pattern or {}).get(alpha_key, config.lora_alpha)
        config = dataclasses.replace(config, target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas,
                                     layers_to_transform=None, layers_pattern=None, exclude_modules=None,
                                     lora_dropout=0.0, inference_mode=True)
        inject_adapter_in_model(config, mirror)
        result = set_peft_model_state_dict(mirror, state)
        missing = sorted(k for k in result.missing_keys if ".lora_" in k)
        if missing or result.unexpected_keys:
            raise AdapterError(f"peft could not load {adapter.path} into the reference: missing "
                               f"{missing[:3]}, unexpected {sorted(result.unexpected_keys)[:3]}")
        # A layer that is a direct child of the mirror's own containers was replaced on the mirror: put it back.
        for name in ("embed_tokens", "layers", "norm"):
            setattr(decoder, name, getattr(mirror.model, name))
        self.vision = mirror.model.vision_embed_tokens
        self.decoder.lm_head = mirror.lm_head
        self._text[0].embed_tokens = self.decoder.get_input_embeddings()
        self._adapter_path = adapter.path
        self.eval()
        return self

    # -- pieces --------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.decoder.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.get_input_embeddings().weight.dtype

    def cache_argument(self, cache) -> dict[str, Any]:
        """The decoder's KV-cache keyword argument. transformers 5.25 renamed forward's `past_key_values` to `cache`
        (the old name still works, with a FutureWarning, until 5.40; so does reading the output's
        `past_key_values`, with a logged warning: callers keep their own DynamicCache, which grows in place);
        earlier 5.x releases know only the old name."""
        return {_cache_name(type(self.decoder)): cache}

    def _tensor(self, x, dtype: torch.dtype | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = torch.from_numpy(np.asarray(x.as_numpy() if hasattr(x, "as_numpy") else x))
        return x.to(device=self.device, dtype=dtype) if dtype is not None else x.to(self.device)

    @torch.no_grad()
    def image_features(self, pixel_values, image_sizes) -> torch.Tensor:
        """[N, 17, 3, 336, 336] + [N, 2] -> [sum of image tokens, hidden] (the ONNX vision model's output)."""
        return self.vision(self._tensor(pixel_values, self.dtype), self._tensor(image_sizes, torch.int64))

    @torch.no_grad()
    def embed(self, input_ids, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [1, S] (-k at image k's positions) -> inputs_embeds [1, S, hidden] (the embedding model's)."""
        ids = self._tensor(input_ids, torch.int64)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        n_image = int((ids < 0).sum())
        if image_features is None:
            image_features = torch.zeros(0, self.decoder.config.hidden_size, dtype=self.dtype, device=self.device)
        if image_features.shape[0] != n_image:
            raise ValueError(f"input_ids hold {n_image} image positions but there are {image_features.shape[0]} "
                             f"image feature rows")
        return self._text[0](ids, image_features.to(self.dtype))

    def _prompt_embeds(self, input_ids, pixel_values, image_sizes, image_features) -> torch.Tensor:
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values, image_sizes)
        embeds = self.embed(input_ids, image_features)
        if embeds.shape[0] != 1:
            raise ValueError(f"the reference runs one prompt at a time (batch 1), got batch {embeds.shape[0]}")
        return embeds

    @torch.no_grad()
    def prefill_logits(self, input_ids, pixel_values=None, image_sizes=None, *,
                       image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of every prompt position, [S, vocab] in float32 (the last row picks the first new token).
        `image_features` (from `image_features()`) skips the vision model."""
        embeds = self._prompt_embeds(input_ids, pixel_values, image_sizes, image_features)
        return self.decoder(inputs_embeds=embeds, use_cache=False).logits[0].float()

    @torch.no_grad()
    def greedy_steps(self, input_ids, pixel_values=None, image_sizes=None, max_new_tokens: int = 16,
                     eos_token_id: int | Sequence[int] | None = None, ignore_eos: bool = False, *,
                     image_features: torch.Tensor | None = None, keep_prefill_logits: bool = False) -> GreedyTrace:
        """`generate_greedy` with its logits: the logits each token was picked from (row 0: the prefill's last
        position, as og's `get_logits()` gives them before each `generate_next_token()`), and with
        `keep_prefill_logits` every prompt position's (as `prefill_logits`, without a second prefill)."""
        from transformers import DynamicCache

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        eos = self.eos_token_ids if eos_token_id is None else (
            (int(eos_token_id),) if isinstance(eos_token_id, int) else tuple(int(t) for t in eos_token_id))
        eos_index = torch.tensor(eos, dtype=torch.int64, device=self.device)
        embeds = self._prompt_embeds(input_ids, pixel_values, image_sizes, image_features)
        cache = DynamicCache(config=self.decoder.config)
        out = self.decoder(inputs_embeds=embeds, use_cache=True, logits_to_keep=0 if keep_prefill_logits else 1,
                           **self.cache_argument(cache))
        prefill = out.logits[0].float() if keep_prefill_logits else None
        tokens: list[int] = []
        steps: list[torch.Tensor] = []
        while True:
            logits = out.logits[0, -1].float().clone()
            steps.append(logits.clone())
            if ignore_eos and len(eos):
                logits[eos_index] = torch.finfo(logits.dtype).min
            token = int(torch.argmax(logits))
            tokens.append(token)
            if len(tokens) >= max_new_tokens or (not ignore_eos and token in eos):
                return GreedyTrace(tokens, torch.stack(steps), prefill)
            next_ids = torch.tensor([[token]], dtype=torch.int64, device=self.device)
            out = self.decoder(input_ids=next_ids, use_cache=True, logits_to_keep=1,
                               **self.cache_argument(cache))  # the DynamicCache grows in place

    def generate_greedy(self, input_ids, pixel_values=None, image_sizes=None, max_new_tokens: int = 16,
                        eos_token_id: int | Sequence[int] | None = None, ignore_eos: bool = False, *,
                        image_features: torch.Tensor | None = None) -> list[int]:
        """Greedy tokens after the prompt, with transformers' KV cache: prefill on `inputs_embeds`, then one token
        id at a time with `past_key_values`. Stops after an end token (included in the list, as og returns it)
        or `max_new_tokens`. `eos_token_id` defaults to the checkpoint's (see `eos_token_ids`). `ignore_eos`
        never picks an end token (og's `min_length = max_length`: the benchmarks' setting)."""
        return self.greedy_steps(input_ids, pixel_values, image_sizes, max_new_tokens, eos_token_id, ignore_eos,
                                 image_features=image_features).tokens

    @torch.no_grad()
    def generate_from_inputs(self, inputs, max_new_tokens: int = 16, **kwargs) -> list[int]:
        """`generate_greedy` on og's processor output (og.NamedTensors or a dict of arrays/tensors)."""
        return self.generate_greedy(*_og_inputs(inputs), max_new_tokens=max_new_tokens, **kwargs)


@functools.cache
def _cache_name(decoder_class: type) -> str:
    """Looked up once per class: a decode loop passes the cache at every token."""
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"


def _og_inputs(inputs) -> tuple:
    """(input_ids, pixel_values or None, image_sizes or None) from og's processor output."""
    def get(name):
        try:
            value = inputs[name]
        except (KeyError, IndexError, RuntimeError):
            return None
        return np.asarray(value.as_numpy()) if hasattr(value, "as_numpy") else value

    ids = get("input_ids")
    pixels = get("pixel_values")
    sizes = get("image_sizes")
    if pixels is None or int((np.asarray(ids) < 0).sum()) == 0:
        return ids, None, None
    return ids, pixels, np.asarray(sizes).astype(np.int64)


def _eos_ids(cfg: Mapping[str, Any], path: Path) -> tuple[int, ...]:
    """End tokens: config.json's eos_token_id, generation_config.json's if any, and the tokenizer's end of turn
    `<|end|>` (32007), which the release's genai_config.json uses and the reference notebook passes to generate()
    (the real config.json alone may name only `</s>`)."""
    ids: list[int] = []

    def add(value) -> None:
        for v in value if isinstance(value, list) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))

    add(cfg.get("eos_token_id"))
    gen = path / "generation_config.json"
    if gen.is_file():
        add(json.loads(gen.read_text()).get("eos_token_id"))
    add(contract.EOS_TOKEN_ID)
    return tuple(ids)
