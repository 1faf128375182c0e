"""`phi3v-ort export` (phi3v_ort.export): a checkpoint in each family's real layout -> the release's package.

The synthetic packages of conftest.SYNTHETIC are themselves exports (scripts/make_synthetic_model.py writes a random
checkpoint in the real layout and exports it with this code); here the exporter is driven by its command line too:
fp32 greedy identity with the torch reference for both families, an int4 export with the built-in check, a LoRA
adapter merged (equal to the reference with peft's adapter applied, different from the base), and the refusals.
Skipped with a reason when the build extra is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phi3v_ort.package import contract

from tests.conftest import needs_build

pytestmark = [needs_build, pytest.mark.build]

NEW_TOKENS = 16
QUESTION = "Describe the image."
NESTED = "model.vision_embed_tokens.img_processor.vision_model."
ADAPTER_MODULES = {  # stored module path -> (out, in, r): decoder layers and the CLIP tower in its nested spelling
    "model.layers.0.self_attn.qkv_proj": (96, 32, 4),
    "model.layers.1.mlp.down_proj": (32, 64, 4),
    "model.layers.1.self_attn.o_proj": (32, 32, 4),
    NESTED + "encoder.layers.1.self_attn.q_proj": (32, 32, 4),
    "model.vision_embed_tokens.img_projection.0": (32, 128, 4),
}


def export(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "phi3v_ort", "export", *args, *(() if check else ("--no-check",))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def greedy(package: Path, png, reference=None, n_images: int = 1) -> tuple[list[int], list[int] | None]:
    """(og's greedy tokens through the runtime, the torch reference's on the very same arrays)."""
    from phi3v_ort.engine.generation import generate, prepare
    from phi3v_ort.inputs.images import load_image
    from phi3v_ort.engine.model import load_model
    from phi3v_ort.engine.settings import GenerationSettings

    model = load_model(package, device="cpu")
    images = [load_image(str(png(640, 400, seed=1))), load_image(str(png(300, 700, seed=2)))][:n_images]
    og_tokens = list(generate(model, QUESTION, images, GenerationSettings(max_new_tokens=NEW_TOKENS)).token_ids)
    if reference is None:
        return og_tokens, None
    prepared = prepare(model, QUESTION, images)
    ids = prepared.input_ids.astype("int64")
    pt = reference.generate_greedy(ids, prepared.pixel_values, prepared.image_sizes, NEW_TOKENS)
    return og_tokens, pt


@pytest.fixture(scope="module")
def phi3(synthetic):
    return synthetic.get("tiny-fp32-cpu")


def checkpoint_of(package: Path) -> Path:
    return package.with_name(package.name + ".checkpoint")


@pytest.mark.synthetic("tiny-fp32-cpu", "tiny-fp32-cpu-phi35")
@pytest.mark.parametrize("name, family", [("tiny-fp32-cpu", "phi-3"), ("tiny-fp32-cpu-phi35", "phi-3.5")])
def test_fp32_export_of_each_family_is_greedy_identical_to_the_reference(synthetic, png, name, family):
    from phi3v_ort.reference.model import Phi3VisionReference

    package = synthetic.get(name)
    ckpt = checkpoint_of(package)
    # the checkpoint is the family's real layout: sharded with an index, CLIP nested, rope_scaling as it spells it
    config = json.loads((ckpt / "config.json").read_text())
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert config["rope_scaling"]["type"] == {"phi-3": "su", "phi-3.5": "longrope"}[family]
    assert len(set(index["weight_map"].values())) == 2
    assert any(k.startswith(NESTED) for k in index["weight_map"])
    names = {"phi-3": contract.PHI3_FILE_NAMES, "phi-3.5": contract.PHI35_FILE_NAMES}[family]
    genai = json.loads((package / "genai_config.json").read_text())["model"]
    assert (genai["vision"]["filename"], genai["embedding"]["filename"], genai["decoder"]["filename"]) == \
        (names.vision, names.embedding, names.decoder)
    for f in (names.vision, names.embedding, names.decoder):
        assert (package / f).is_file() and (package / (f + ".data")).is_file()

    og_tokens, pt_tokens = greedy(package, png, Phi3VisionReference.from_checkpoint(ckpt), n_images=2)
    assert og_tokens == pt_tokens and len(og_tokens) == NEW_TOKENS


@pytest.mark.synthetic("tiny-fp32-cpu")
def test_int4_export_from_the_command_line_loads_runs_and_reports_its_check(phi3, png, tmp_path):
    out = tmp_path / "pkg"
    proc = export("--checkpoint", str(checkpoint_of(phi3)), "--out", str(out), "--variant", "cpu-int4", "--json",
                  check=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["variant"] == "cpu-int4" and result["family"] == "phi-3" and Path(result["path"]) == out
    assert result["peak_pss_bytes"] > 100 * 2**20 and result["phases_s"]["decoder_builder"] > 0
    assert set(result["phase_peak_pss_bytes"]) == {"vision_and_embedding", "decoder_staging", "decoder_builder",
                                                   "decoder_quantize"}
    check = result["check"]
    assert check["precision"] == "int4" and check["passed"] is None and check["finite"]
    assert check["steps"] == 32 and 0 <= check["agreement"] <= 32
    # int4 weights: MatMulNBits in the decoder, block 32, accuracy level 4 (the CPU release)
    import onnx

    decoder = onnx.load(str(out / contract.PHI3_FILE_NAMES.decoder), load_external_data=False)
    nbits = [n for n in decoder.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all({a.name: a.i for a in n.attribute}["block_size"] == 32 for n in nbits)
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nbits)
    tokens, _ = greedy(out, png)
    assert len(tokens) >= 1


@pytest.mark.synthetic("tiny-fp32-cpu")
def test_fp32_export_check_passes_and_says_so(phi3, tmp_path):
    out = tmp_path / "pkg"
    proc = export("--checkpoint", str(checkpoint_of(phi3)), "--out", str(out), "--variant", "cpu-fp32", check=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    summary = [line for line in proc.stderr.splitlines() if line.startswith("check:")]
    assert len(summary) == 1 and "32/32" in summary[0] and summary[0].endswith("passed"), proc.stderr


@pytest.mark.synthetic("tiny-fp32-cpu")
def test_gpu_fp16_export_is_float16_throughout_and_runs_on_the_cpu(phi3, png, tmp_path):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "pkg"
    proc = export("--checkpoint", str(checkpoint_of(phi3)), "--out", str(out), "--variant", "gpu-fp16", "--json",
                  check=True)
    assert proc.returncode == 0, proc.stderr
    check = json.loads(proc.stdout)["check"]
    assert check["precision"] == "fp16" and check["passed"] is None and check["finite"], check
    names = contract.PHI3_FILE_NAMES
    for name in (names.vision, names.embedding, names.decoder):
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        assert "tensor(float16)" in {i.type for i in session.get_inputs()}, name
    decoder = onnx.load(str(out / names.decoder), load_external_data=False)
    assert not [n for n in decoder.graph.node if n.op_type == "MatMulNBits"]
    genai = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert "cuda" in genai["session_options"]["provider_options"][0]
    tokens, _ = greedy(out, png)
    assert len(tokens) >= 1


def write_adapter(path: Path, seed: int = 5) -> Path:
    """A PEFT LoRA adapter folder as peft saves one for the remote-code model (keys under base_model.model.,
    the CLIP tower nested), strong enough to change the greedy answer."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module, (out, inp, r) in ADAPTER_MODULES.items():
        state[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, inp, generator=gen) * 0.5
        state[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, r, generator=gen) * 0.5
    path.mkdir(parents=True)
    save_file(state, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": False, "use_dora": False,
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ADAPTER_MODULES}), "modules_to_save": None,
              "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.05, "task_type": "CAUSAL_LM",
              "base_model_name_or_path": "microsoft/Phi-3-vision-128k-instruct"}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.mark.synthetic("tiny-fp32-cpu")
def test_lora_adapter_is_merged_like_peft_applies_it(phi3, png, tmp_path):
    from phi3v_ort.reference.model import Phi3VisionReference

    adapter = write_adapter(tmp_path / "lora")
    out = tmp_path / "merged"
    proc = export("--checkpoint", str(checkpoint_of(phi3)), "--out", str(out), "--variant", "cpu-fp32",
                  "--adapter", str(adapter), check=True)
    assert proc.returncode == 0, proc.stderr
    assert any(line.startswith("check:") and line.endswith("passed") for line in proc.stderr.splitlines())

    reference = Phi3VisionReference.from_checkpoint(checkpoint_of(phi3)).apply_adapter(adapter)
    merged_tokens, peft_tokens = greedy(out, png, reference)
    assert merged_tokens == peft_tokens
    base_tokens, _ = greedy(phi3, png)
    assert merged_tokens != base_tokens, "the adapter did not change the answer"


def _copy_without(ckpt: Path, dst: Path, drop: str | None = None, reshape: str | None = None) -> Path:
    """A copy of the checkpoint with one tensor dropped or given a wrong shape (in its shard and the index)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(ckpt, dst)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = drop or reshape
    shard = dst / index["weight_map"][name]
    tensors = load_file(str(shard))
    if drop:
        del tensors[name], index["weight_map"][name]
    else:
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:], dtype=tensors[name].dtype)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    return dst


@pytest.mark.synthetic("tiny-fp32-cpu")
@pytest.mark.parametrize("case", ["missing", "wrong-shape"])
def test_a_broken_checkpoint_is_one_line_naming_the_tensor(phi3, tmp_path, case):
    name = "model.layers.1.mlp.down_proj.weight" if case == "missing" else NESTED + "encoder.layers.0.mlp.fc1.weight"
    broken = _copy_without(checkpoint_of(phi3), tmp_path / "ckpt", **({"drop": name} if case == "missing"
                                                                      else {"reshape": name}))
    out = tmp_path / "pkg"
    proc = export("--checkpoint", str(broken), "--out", str(out))
    assert_one_line_error(proc, name, *(("lacks",) if case == "missing" else ("shape", "[65, 32]", "[64, 32]")))
    assert not out.exists() and not list(tmp_path.glob(".pkg.*")), "nothing may be left behind"


@pytest.mark.synthetic("tiny-fp32-cpu")
def test_refusals_leave_existing_files_alone(phi3, tmp_path):
    ckpt = checkpoint_of(phi3)
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(export("--checkpoint", str(ckpt), "--out", str(out)), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1

    bad = tmp_path / "bad-lora"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    from safetensors.torch import save_file
    import torch

    save_file({"base_model.model.model.layers.0.self_attn.nope.lora_A.weight": torch.zeros(4, 32),
               "base_model.model.model.layers.0.self_attn.nope.lora_B.weight": torch.zeros(32, 4)},
              str(bad / "adapter_model.safetensors"))
    assert_one_line_error(export("--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--adapter", str(bad)),
                          "model.layers.0.self_attn.nope")
    assert not (tmp_path / "x").exists()

    not_phi = tmp_path / "not-phi"
    not_phi.mkdir()
    (not_phi / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_one_line_error(export("--checkpoint", str(not_phi), "--out", str(tmp_path / "y")), "phi3_v")
