"""Build tier: the ONNX package (onnxruntime-genai) and the transformers reference (torch_reference) agree.

One fp32 tiny package + checkpoint is built per test run (conftest.py's `synthetic`); both engines get the very same tensors from og's
multimodal processor (PNG images, so no decoder rounding enters) and must give the same greedy tokens and close
logits: text-only, one image (1938 prompt tokens: LongRoPE's short factors), two images (4318 prompt tokens,
past the original 4096 context: the long factors and og's If-selected long rotary cache), and one image with a
long question (4090 prompt tokens) whose decode crosses 4096 on the 7th new token, where both engines must switch
from the short to the long rotary factors at the same step (keeping the cached keys as they were rotated).

Skipped with a reason when the build extra (torch, transformers, onnx, ...) is not installed.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime_genai as og
import pytest

from tests.conftest import needs_build

pytestmark = [needs_build, pytest.mark.build, pytest.mark.synthetic("tiny-fp32-cpu")]

NEW_TOKENS = 16
QUESTION = "Describe the image."
IMAGES = ((640, 400, 1), (300, 700, 2))  # (width, height, seed): 1921 and 2377 image tokens
# name: (images, question, prompt tokens), with the reference processor's BOS before each text chunk (the runtime's
# input pipeline). " word" is 2 tokens in the synthetic tokenizer: 1938 + 2 * 1076 = 4090.
CASES = {
    "text": (0, QUESTION, 14),
    "one-image": (1, QUESTION, 1938),
    "two-images": (2, QUESTION, 4318),
    "crossing-4096": (1, QUESTION + " word" * 1076, 4090),
}

# Logit tolerance, relative to the largest |logit| the reference picked a token from (~0.55 on random weights).
# Both sides run fp32; they differ only in summation order: MLAS GEMMs vs torch's, GroupQueryAttention's fused
# softmax and in-kernel rotary vs transformers' eager attention, fused SkipSimplifiedLayerNormalization, and the
# ONNX export of the vision tower. Measured (2-core x86 CPU): <= 1.2e-6 relative on all four prompts, over every
# prefill position and every decode step. 1e-5 leaves ~10x headroom for other CPUs/BLAS kernels and still
# catches real mismatches: dropping LongRoPE's magnitude scale (1.04 for this 8192/4096 preset) moves the logits
# by 2-3e-4 relative, taking the short factors past 4096 tokens by 3.5e-3 (two-image prompt) or by 1-3e-3 from
# the step that crosses 4096 (crossing-4096).
# Not a bound on greedy ties: the one-image prompt has a step whose top-2 gap is only ~2e-5 absolute; the tokens
# still agree because the engines agree to ~1e-6, and a flip is reported with its gap (never tolerated).
LOGIT_RTOL = 1e-5


@pytest.fixture(scope="module")
def built(synthetic):
    return synthetic.get("tiny-fp32-cpu")  # built once per run by scripts/make_synthetic_model.py (conftest.py)


@pytest.fixture(scope="module")
def runtime_model(built):
    from phi3v_ort.engine.model import load_model

    return load_model(built, device="cpu")


@pytest.fixture(scope="module")
def reference(built):
    from phi3v_ort.reference.model import Phi3VisionReference

    return Phi3VisionReference.from_checkpoint(built.with_name(built.name + ".checkpoint"))


@pytest.fixture(scope="module")
def results():
    """Greedy tokens per prompt, filled by the parity test and reused by the real-layout test."""
    return {}


def _images(png, n):
    from phi3v_ort.inputs.images import load_image

    return [load_image(str(png(w, h, seed=s))) for w, h, s in IMAGES[:n]]


def og_steps(model, inputs, prompt_len, max_new_tokens):
    """A bare og loop: (tokens, full prefill logits [S, vocab], the logits each token was picked from).

    In og 0.18 `set_inputs` already runs the prefill: its logits are there before the first
    `generate_next_token()`, which picks a token and then runs the decoder on it (so `get_logits()` after it is the
    *next* step's)."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_len + max_new_tokens)
    gen = og.Generator(model, params)
    gen.set_inputs(inputs)
    prefill = np.asarray(gen.get_output("logits"))[0]
    tokens, steps = [], []
    while not gen.is_done():
        steps.append(np.asarray(gen.get_logits()).reshape(-1).copy())
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    del gen
    return tokens, prefill, np.stack(steps)


def _torch_inputs(prepared):
    ids = prepared.input_ids.astype(np.int64)  # the very arrays og gets (ModelInputs.to_og)
    if not prepared.image_tokens:
        return ids, None, None
    return ids, prepared.pixel_values, prepared.image_sizes


def _max_abs_diff(a: np.ndarray, b: np.ndarray, rows: int = 256) -> float:
    """max |a - b| over [S, vocab] arrays, a block of rows at a time (a 4k-token prompt's logits are 550 MB)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return max(float(np.abs(a[i:i + rows] - b[i:i + rows]).max()) for i in range(0, len(a), rows))


def _first_flip(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _top2_gap(logits: np.ndarray) -> float:
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0])


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_package_matches_the_torch_reference(runtime_model, reference, results, png, case):
    from phi3v_ort.engine.generation import generate, prepare
    from phi3v_ort.engine.settings import GenerationSettings

    n_images, question, prompt_tokens = CASES[case]
    images = _images(png, n_images)
    finished = generate(runtime_model, question, images, GenerationSettings(max_new_tokens=NEW_TOKENS))
    prepared = prepare(runtime_model, question, images)
    assert prepared.prompt_tokens == prompt_tokens
    og_tokens, og_prefill, og_step_logits = og_steps(runtime_model.og_model, prepared.to_og(),
                                                     prepared.prompt_tokens, NEW_TOKENS)

    ids, pixel_values, image_sizes = _torch_inputs(prepared)
    trace = reference.greedy_steps(ids, pixel_values, image_sizes, max_new_tokens=NEW_TOKENS,
                                   keep_prefill_logits=True)
    pt_tokens, pt_step_logits, pt_prefill = trace.tokens, trace.step_logits.numpy(), trace.prefill_logits.numpy()
    results[case] = pt_tokens

    # (b) logits: every prompt position of the prefill, then the logits each new token was picked from.
    scale = float(np.abs(pt_step_logits).max())
    prefill_diff = _max_abs_diff(og_prefill, pt_prefill)
    n = min(len(og_step_logits), len(pt_step_logits))
    step_diff = float(np.abs(og_step_logits[:n] - pt_step_logits[:n]).max())
    print(f"\n[{case}: {n_images} image(s), {prepared.prompt_tokens} prompt tokens] max |logit| {scale:.3g}; "
          f"prefill max abs diff {prefill_diff:.3g} (rel {prefill_diff / scale:.3g}); "
          f"decode steps max abs diff {step_diff:.3g} (rel {step_diff / scale:.3g})")
    assert prefill_diff <= LOGIT_RTOL * scale, f"prefill logits differ by {prefill_diff:.3g} (scale {scale:.3g})"

    # (a) greedy tokens: the runtime, a bare og loop and the torch reference.
    assert list(finished.token_ids) == og_tokens, "the runtime and a bare og loop disagree"
    if og_tokens != pt_tokens:
        i = _first_flip(og_tokens, pt_tokens)
        gap = _top2_gap(pt_step_logits[i]) if i < len(pt_step_logits) else float("nan")
        tie = gap <= LOGIT_RTOL * scale
        pytest.fail(f"greedy tokens diverge at new token {i}: og {og_tokens[i:i + 3]}..., torch "
                    f"{pt_tokens[i:i + 3]}...; torch's top-2 gap there is {gap:.3g} "
                    f"({'a near-tie within' if tie else 'NOT a tie: above'} the logit tolerance "
                    f"{LOGIT_RTOL * scale:.3g})")
    assert len(pt_tokens) == NEW_TOKENS or pt_tokens[-1] in reference.eos_token_ids
    assert step_diff <= LOGIT_RTOL * scale, f"decode-step logits differ by {step_diff:.3g} (scale {scale:.3g})"


def test_sdpa_reference_matches_eager(built, reference, runtime_model, png):
    from phi3v_ort.engine.generation import prepare
    from phi3v_ort.reference.model import Phi3VisionReference

    sdpa = Phi3VisionReference.from_checkpoint(built.with_name(built.name + ".checkpoint"),
                                               attn_implementation="sdpa")
    ids, pixel_values, image_sizes = _torch_inputs(prepare(runtime_model, QUESTION, _images(png, 1)))
    eager = reference.greedy_steps(ids, pixel_values, image_sizes, max_new_tokens=8)
    sdpa_trace = sdpa.greedy_steps(ids, pixel_values, image_sizes, max_new_tokens=8)
    assert sdpa_trace.tokens == eager.tokens
    scale = float(eager.step_logits.abs().max())
    assert float((sdpa_trace.step_logits - eager.step_logits).abs().max()) <= LOGIT_RTOL * scale


# -- the other checkpoint layout ---------------------------------------------------------------------------------

def write_flat_layout(ckpt, out):
    """`ckpt` (the real published layout: shards, index, `rope_scaling: {"type": "su"}`, the CLIP tower nested under
    `...img_processor.vision_model.`) rewritten as transformers 5 saves these modules: one model.safetensors,
    the CLIP tower flat (`...img_processor.<...>`), `rope_parameters` instead of rope_scaling + rope_theta."""
    from safetensors.torch import save_file

    from phi3v_ort.reference.model import decoder_config, iter_checkpoint

    real = json.loads((ckpt / "config.json").read_text())
    config = {k: v for k, v in real.items() if k not in ("rope_scaling", "rope_theta", "auto_map")}
    config["rope_parameters"] = decoder_config(real, __import__("torch").float32, "eager").rope_parameters
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {name: tensor for name, _, tensor in iter_checkpoint(ckpt)}
    assert not any(".img_processor.vision_model." in k for k in tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_both_checkpoint_layouts_load_and_generate_the_same(built, reference, runtime_model, results, png, tmp_path):
    import torch

    from phi3v_ort.engine.generation import prepare
    from phi3v_ort.reference.model import CheckpointError, Phi3VisionReference

    ckpt = built.with_name(built.name + ".checkpoint")
    real = json.loads((ckpt / "config.json").read_text())
    assert real["rope_scaling"]["type"] == "su" and "rope_parameters" not in real
    assert reference.decoder.config.rope_parameters["rope_type"] == "longrope"
    assert reference.decoder.config.rope_parameters["original_max_position_embeddings"] == 4096
    assert reference.vision.img_processor.config.hidden_act == "quick_gelu"
    assert 32007 in reference.eos_token_ids and 2 in reference.eos_token_ids

    flat = write_flat_layout(ckpt, tmp_path / "flat")
    loaded = Phi3VisionReference.from_checkpoint(flat)
    ours, theirs = reference.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name
    # The rotary tables (short and long) come out the same from "su" + rope_theta as from rope_parameters.
    assert torch.equal(loaded.decoder.model.rotary_emb.inv_freq, reference.decoder.model.rotary_emb.inv_freq)
    assert loaded.decoder.model.rotary_emb.attention_scaling == reference.decoder.model.rotary_emb.attention_scaling

    ids, pixel_values, image_sizes = _torch_inputs(prepare(runtime_model, QUESTION, _images(png, 1)))
    expected = results.get("one-image") or reference.generate_greedy(ids, pixel_values, image_sizes, NEW_TOKENS)
    assert loaded.generate_greedy(ids, pixel_values, image_sizes, NEW_TOKENS) == expected

    # Without `vision_config` (the real config.json has none) the loader assumes ViT-L/14-336 and says what does not fit.
    no_dims = tmp_path / "no-vision-config"
    shutil.copytree(flat, no_dims)
    config = json.loads((no_dims / "config.json").read_text())
    del config["vision_config"]
    (no_dims / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="image_dim_out|shape mismatch"):
        Phi3VisionReference.from_checkpoint(no_dims)


def test_loader_lists_missing_and_unexpected_keys(built, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from phi3v_ort.reference.model import CheckpointError, Phi3VisionReference

    ckpt = write_flat_layout(built.with_name(built.name + ".checkpoint"), tmp_path / "flat")
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(ckpt / "config.json", broken / "config.json")
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors.pop("model.vision_embed_tokens.glb_GN")
    tensors["vision_model.sub_GN"] = tensors.pop("model.vision_embed_tokens.sub_GN")
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        Phi3VisionReference.from_checkpoint(broken)
    message = str(err.value)
    assert "2 missing key(s)" in message and "model.vision_embed_tokens.glb_GN" in message
    assert "1 unexpected key(s)" in message and "vision_model.sub_GN" in message


def test_the_reference_and_the_bench_engine_leave_no_deprecation_notes(built, reference, capfd):
    """Both pass and keep their KV cache under the name the installed transformers uses (5.25 renamed
    `past_key_values` to `cache`, with a FutureWarning and a logged note for the old name): nothing of it may
    reach `phi3v-ort bench`'s output."""
    import logging
    import warnings

    import torch

    from phi3v_ort.bench.engines import TorchEngine

    logging.Logger.warning_once.cache_clear()  # transformers says each note once per process
    ids = np.array([[1, 450, 1967, 338, 263]], dtype=np.int64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = reference.greedy_steps(torch.from_numpy(ids), max_new_tokens=4, ignore_eos=True).tokens
        engine = TorchEngine(str(built.with_name(built.name + ".checkpoint")), "cpu", threads=1)
        timed = engine.generate({"input_ids": ids}, 4, 0.0)
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], \
        [str(w.message) for w in caught]
    assert "deprecated" not in capfd.readouterr().err
    assert timed["token_ids"] == tokens  # the same cache handling on both paths
