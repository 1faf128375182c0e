"""phi3v_ort.reference.lora: the exporter's own tensor-by-tensor LoRA merge, checked against peft (the oracle), and
`Phi3VisionReference.apply_adapter`, the peft-driven reference the exporter validates against."""

from __future__ import annotations

import copy
import json
import math

import pytest

from tests.conftest import needs_build

pytestmark = [needs_build, pytest.mark.build]

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from phi3v_ort.reference.lora import AdapterError, LoraAdapter
from phi3v_ort.reference.modules import Phi3VImageEmbedding
from phi3v_ort.reference.model import Phi3VisionReference, parameter_targets
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, Phi3Config, Phi3ForCausalLM

HIDDEN = 32
DECODER_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
NESTED_Q = "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.self_attn.q_proj"
FLAT_Q = "model.vision_embed_tokens.img_processor.encoder.layers.0.self_attn.q_proj"
QKV = "model.layers.0.self_attn.qkv_proj"


def tiny_decoder(seed: int = 0) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    config = Phi3Config(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return Phi3ForCausalLM(config).eval()


def tiny_reference(seed: int = 0, dtype=torch.float32) -> Phi3VisionReference:
    decoder = tiny_decoder(seed)
    clip = CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=336, patch_size=14, hidden_act="quick_gelu")
    clip._attn_implementation = "eager"
    vision = Phi3VImageEmbedding(clip, HIDDEN)
    with torch.no_grad():  # the separators start at zero: make them count
        vision.glb_GN.normal_()
        vision.sub_GN.normal_()
    return Phi3VisionReference(vision.eval(), decoder).to(dtype).eval()


def peft_adapter(tmp_path, **lora):
    """A tiny Phi3ForCausalLM, peft's LoRA on it with random (non-zero) lora_B, saved to tmp_path. Returns the base
    weights (before), peft's merge_and_unload weights, and the peft model's LoRA layers by module name."""
    model = tiny_decoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**{"r": 4, "lora_alpha": 8,
                                                           "target_modules": DECODER_TARGETS, **lora}))
    torch.manual_seed(1)
    layers = {}
    with torch.no_grad():
        for name, module in wrapped.base_model.model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.lora_B["default"].weight.normal_(0, 0.5)
                layers[name] = module
    wrapped.save_pretrained(tmp_path)
    scales = {name: layer.scaling["default"] for name, layer in layers.items()}
    merged = {k: v.clone() for k, v in wrapped.merge_and_unload().state_dict().items()}
    return before, merged, scales


def assert_merge_matches(adapter: LoraAdapter, before, merged) -> None:
    adapter.check_against({k: tuple(v.shape) for k, v in before.items()})
    for name, weight in before.items():
        out = adapter.merge(name, weight)
        if name in adapter.targets:
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, merged[name], atol=1e-6, rtol=0, msg=name)
            assert not torch.equal(out, weight), name
        else:
            assert out is weight, name
            assert torch.equal(merged[name], weight), name
    assert adapter.unmerged() == []
    assert adapter.merged_names == set(adapter.targets)
    adapter.check_all_merged()


# -- 1. the merge is peft's ---------------------------------------------------------------------------------------

def test_merge_equals_peft_merge_and_unload(tmp_path):
    before, merged, _ = peft_adapter(tmp_path)
    adapter = LoraAdapter.open(tmp_path)
    expected = {f"model.layers.{i}.{part}.{proj}.weight": None for i in range(2)
                for part, proj in [("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"),
                                   ("mlp", "down_proj")]}
    assert set(adapter.targets) == set(expected)
    assert adapter.targets["model.layers.0.mlp.gate_up_proj.weight"] == (128, HIDDEN)
    assert adapter.delta("lm_head.weight") is None
    assert_merge_matches(adapter, before, merged)


def test_merge_twice_and_unmerged_are_caught(tmp_path):
    before, _, _ = peft_adapter(tmp_path)
    adapter = LoraAdapter.open(tmp_path)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    adapter.merge(name, before[name])
    assert len(adapter.unmerged()) == 7
    with pytest.raises(AdapterError, match="never merged"):
        adapter.check_all_merged()
    with pytest.raises(AdapterError, match="merged twice"):
        adapter.merge(name, before[name])


# -- 2. rslora, rank_pattern, alpha_pattern, fan_in_fan_out: peft's scale ----------------------------------------

def test_rslora_and_patterns_give_peft_scale(tmp_path):
    before, merged, scales = peft_adapter(
        tmp_path, use_rslora=True,
        rank_pattern={r"layers.1.self_attn.qkv_proj": 2, r"layers\.0\..*down_proj": 6},
        alpha_pattern={"o_proj": 3, "down_proj": 5, "model.layers.0.mlp.gate_up_proj": 16})
    adapter = LoraAdapter.open(tmp_path)
    ours = {m.source: m.scale for m in adapter.modules.values()}
    assert ours == pytest.approx(scales, rel=1e-12)
    assert ours["model.layers.1.self_attn.qkv_proj"] == pytest.approx(8 / math.sqrt(2))
    assert ours["model.layers.0.mlp.down_proj"] == pytest.approx(5 / math.sqrt(6))
    assert ours["model.layers.0.mlp.gate_up_proj"] == pytest.approx(16 / 2)
    assert adapter.targets["model.layers.0.mlp.down_proj.weight"] == (HIDDEN, 64)
    assert_merge_matches(adapter, before, merged)


def test_fan_in_fan_out_is_ignored_on_linear_layers_as_peft_does(tmp_path):
    before, _, _ = peft_adapter(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["fan_in_fan_out"] = True
    config_path.write_text(json.dumps(config))
    base = tiny_decoder()
    base.load_state_dict(before)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        loaded = peft.PeftModel.from_pretrained(base, str(tmp_path))
    merged = {k: v.clone() for k, v in loaded.merge_and_unload().state_dict().items()}
    assert_merge_matches(LoraAdapter.open(tmp_path), before, merged)


# -- 3. names: nested CLIP, bare prefixes, adapter-name segments --------------------------------------------------

def write_adapter(path, modules: dict[str, tuple[int, int, int]], seed: int = 2, segment: str = "",
                  **config) -> None:
    """An adapter folder written by hand: {stored module path: (out, in, r)}, keys under base_model.model."""
    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for module, (out, inp, r) in modules.items():
        state[f"base_model.model.{module}.lora_A{segment}.weight"] = torch.randn(r, inp) * 0.3
        state[f"base_model.model.{module}.lora_B{segment}.weight"] = torch.randn(out, r) * 0.3
    save_file(state, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": sorted({m.rsplit(".", 1)[-1]
                                                                                   for m in modules}),
           "use_rslora": False, "use_dora": False, "modules_to_save": None, "bias": "none",
           "fan_in_fan_out": False, "lora_dropout": 0.0, "task_type": None, **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_nested_clip_names_map_to_the_flat_canonical_name(tmp_path):
    write_adapter(tmp_path, {NESTED_Q: (HIDDEN, HIDDEN, 4)},
                  alpha_pattern={"vision_model.encoder.layers.0.self_attn.q_proj": 2})
    adapter = LoraAdapter.open(tmp_path)
    assert adapter.targets == {FLAT_Q + ".weight": (HIDDEN, HIDDEN)}
    module = adapter.modules[FLAT_Q + ".weight"]
    assert module.source == NESTED_Q
    assert module.scale == 2 / 4  # the pattern matched the name as trained (nested), not the canonical one


def test_flat_clip_bare_prefix_and_adapter_name_segment(tmp_path):
    write_adapter(tmp_path / "flat", {FLAT_Q: (HIDDEN, HIDDEN, 4)}, segment=".default")
    assert set(LoraAdapter.open(tmp_path / "flat").targets) == {FLAT_Q + ".weight"}
    # trained on the inner Phi3VModel: no "model." prefix
    write_adapter(tmp_path / "bare", {"layers.0.self_attn.qkv_proj": (96, HIDDEN, 4),
                                      NESTED_Q.removeprefix("model."): (HIDDEN, HIDDEN, 4)})
    assert set(LoraAdapter.open(tmp_path / "bare").targets) == {"model.layers.0.self_attn.qkv_proj.weight",
                                                                FLAT_Q + ".weight"}


def test_adapter_model_bin_is_read_like_safetensors(tmp_path):
    write_adapter(tmp_path / "st", {QKV: (96, HIDDEN, 4)})
    write_adapter(tmp_path / "bin", {QKV: (96, HIDDEN, 4)})
    torch.save(load_file(str(tmp_path / "bin" / "adapter_model.safetensors")), tmp_path / "bin" / "adapter_model.bin")
    (tmp_path / "bin" / "adapter_model.safetensors").unlink()
    name = f"{QKV}.weight"
    torch.testing.assert_close(LoraAdapter.open(tmp_path / "bin").delta(name),
                               LoraAdapter.open(tmp_path / "st").delta(name), atol=0, rtol=0)


# -- 4. refusals: one line, naming the thing ----------------------------------------------------------------------


def _refusal(tmp_path, case):
    good = {QKV: (96, HIDDEN, 4)}
    if case == "dora":
        write_adapter(tmp_path, good, use_dora=True)
        return LoraAdapter.open, "use_dora"
    if case == "modules_to_save":
        write_adapter(tmp_path, good, modules_to_save=["lm_head"])
        return LoraAdapter.open, "modules_to_save"
    if case == "not_lora":
        write_adapter(tmp_path, good, peft_type="IA3")
        return LoraAdapter.open, "'IA3'"
    if case == "pissa":
        write_adapter(tmp_path, good, init_lora_weights="pissa_niter_4")
        return LoraAdapter.open, "pissa_niter_4"
    if case == "missing_config":
        write_adapter(tmp_path, good)
        (tmp_path / "adapter_config.json").unlink()
        return LoraAdapter.open, "adapter_config.json"
    if case == "missing_weights":
        write_adapter(tmp_path, good)
        (tmp_path / "adapter_model.safetensors").unlink()
        return LoraAdapter.open, "adapter_model.safetensors"
    if case == "a_without_b":
        write_adapter(tmp_path, good)
        state = {"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": torch.zeros(4, HIDDEN),
                 f"base_model.model.{QKV}.lora_A.weight": torch.zeros(4, HIDDEN),
                 f"base_model.model.{QKV}.lora_B.weight": torch.zeros(96, 4)}
        save_file(state, str(tmp_path / "adapter_model.safetensors"))
        return LoraAdapter.open, "model.layers.0.self_attn.o_proj.lora_A without its lora_B"
    if case == "embedding":
        write_adapter(tmp_path, good)
        save_file({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 128),
                   "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(HIDDEN, 4)},
                  str(tmp_path / "adapter_model.safetensors"))
        return LoraAdapter.open, "model.embed_tokens.lora_embedding_A"
    if case == "conv":
        write_adapter(tmp_path, good)
        patch = "base_model.model.model.vision_embed_tokens.img_processor.embeddings.patch_embedding"
        save_file({f"{patch}.lora_A.weight": torch.zeros(4, 3, 14, 14),
                   f"{patch}.lora_B.weight": torch.zeros(HIDDEN, 4, 1, 1)}, str(tmp_path / "adapter_model.safetensors"))
        return LoraAdapter.open, "conv LoRA"
    if case == "rank":
        write_adapter(tmp_path, {QKV: (96, HIDDEN, 6)})
        return LoraAdapter.open, "rank 6"
    shapes = {f"{QKV}.weight": (96, HIDDEN), "lm_head.weight": (128, HIDDEN)}
    if case == "not_in_checkpoint":
        write_adapter(tmp_path, {**good, "model.layers.7.mlp.down_proj": (HIDDEN, 64, 4)})
        return (lambda p: LoraAdapter.open(p).check_against(shapes),
                "targets model.layers.7.mlp.down_proj.weight, which the checkpoint does not have")
    if case == "wrong_shape":
        write_adapter(tmp_path, {QKV: (64, HIDDEN, 4)})
        return lambda p: LoraAdapter.open(p).check_against(shapes), f"{QKV}.weight with shape (64, 32)"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["dora", "modules_to_save", "not_lora", "pissa", "missing_config",
                                  "missing_weights", "a_without_b", "embedding", "conv", "rank",
                                  "not_in_checkpoint", "wrong_shape"])
def test_refusals_are_one_line_naming_the_thing(tmp_path, case):
    call, named = _refusal(tmp_path / "adapter", case)
    with pytest.raises(AdapterError) as info:
        call(tmp_path / "adapter")
    message = str(info.value)
    assert "\n" not in message
    assert named in message


# -- 5. apply_adapter (peft) == the exporter's merge --------------------------------------------------------------

def test_apply_adapter_equals_merged_weights(tmp_path):
    modules = {
        "model.layers.0.self_attn.qkv_proj": (96, HIDDEN, 4),
        "model.layers.1.self_attn.qkv_proj": (96, HIDDEN, 4),
        NESTED_Q: (HIDDEN, HIDDEN, 4),
        "model.vision_embed_tokens.img_projection.2": (HIDDEN, HIDDEN, 2),
        "lm_head": (128, HIDDEN, 4),  # a direct child of the mirror: must land on the decoder itself
    }
    write_adapter(tmp_path, modules, use_rslora=True, rank_pattern={"img_projection.2": 2},
                  alpha_pattern={"vision_model.encoder.layers.0.self_attn.q_proj": 16, "lm_head": 2})
    # float64, so that peft's unmerged x @ A.T @ B.T * scale and the merged (W + delta) x agree far below the
    # tolerance (in float32 their rounding alone differs by ~3e-5 on these logits)
    base = tiny_reference(dtype=torch.float64)
    merged = copy.deepcopy(base)
    with_peft = copy.deepcopy(base).apply_adapter(tmp_path)

    adapter = LoraAdapter.open(tmp_path)
    params = parameter_targets(merged.decoder, merged.vision)
    adapter.check_against({k: tuple(v.shape) for k, v in params.items()})
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(adapter.merge(name, param))
    adapter.check_all_merged()

    assert isinstance(with_peft.decoder.lm_head, peft.tuners.lora.LoraLayer)
    torch.manual_seed(3)
    pixels = torch.randn(1, 2, 3, 336, 336, dtype=torch.float64)
    sizes = torch.tensor([[336, 336]])
    n_image = base.image_features(pixels, sizes).shape[0]
    ids = torch.tensor([[1, 5, 7] + [-1] * n_image + [9, 11, 13]])

    features = {k: ref.image_features(pixels, sizes) for k, ref in
                [("base", base), ("merged", merged), ("peft", with_peft)]}
    logits = {k: ref.prefill_logits(ids, pixels, sizes) for k, ref in
              [("base", base), ("merged", merged), ("peft", with_peft)]}
    torch.testing.assert_close(features["peft"], features["merged"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["peft"], logits["merged"], atol=1e-5, rtol=1e-5)
    assert (features["peft"] - features["base"]).abs().max() > 1e-2
    assert (logits["peft"] - logits["base"]).abs().max() > 1e-2
    # text only: the decoder's LoRA (qkv, lm_head) alone moves the logits
    text = torch.tensor([[1, 5, 7, 9]])
    torch.testing.assert_close(with_peft.prefill_logits(text), merged.prefill_logits(text), atol=1e-5, rtol=1e-5)


def test_apply_adapter_refuses_a_target_the_reference_lacks(tmp_path):
    write_adapter(tmp_path, {"model.layers.5.self_attn.qkv_proj": (96, HIDDEN, 4)})
    with pytest.raises(AdapterError, match="model.layers.5.self_attn.qkv_proj.weight, which the reference does not"):
        tiny_reference().apply_adapter(tmp_path)
