"""The committed tiny package matches the published release's contract, file by file."""

import json

import onnxruntime as ort
import pytest

from phi3v_ort.package import contract


def _config(d):
    return json.loads((d / "genai_config.json").read_text())


def test_files_are_the_releases(tiny_dir):
    names = contract.PHI3_FILE_NAMES
    expected = set(contract.SIDE_FILES)
    for f in (names.vision, names.embedding, names.decoder):
        expected |= {f, f + ".data"}
    assert {p.name for p in tiny_dir.iterdir()} == expected


def test_genai_config_matches_the_contract(tiny_dir):
    cfg = _config(tiny_dir)
    model = cfg["model"]
    assert model["type"] == "phi3v"
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (1, 32007, 32000)
    assert model["vocab_size"] == 32064
    dec = model["decoder"]
    assert dec["filename"] == contract.PHI3_FILE_NAMES.decoder
    assert dec["inputs"] == contract.DECODER_INPUTS and dec["outputs"] == contract.DECODER_OUTPUTS
    assert dec["head_size"] * dec["num_attention_heads"] == dec["hidden_size"]
    assert dec["session_options"]["provider_options"] == []  # the CPU build
    assert model["embedding"] == {"filename": contract.PHI3_FILE_NAMES.embedding,
                                  "inputs": contract.EMBEDDING_INPUTS, "outputs": contract.EMBEDDING_OUTPUTS}
    assert model["vision"] == {"filename": contract.PHI3_FILE_NAMES.vision,
                               "inputs": contract.VISION_INPUTS, "outputs": contract.VISION_OUTPUTS}
    search = cfg["search"]
    assert search["past_present_share_buffer"] is True and search["do_sample"] is False
    assert search["max_length"] == model["context_length"]


def test_processor_config_is_decode_rgb_phi3_transform(tiny_dir):
    transforms = json.loads((tiny_dir / "processor_config.json").read_text())["processor"]["transforms"]
    assert [t["operation"]["type"] for t in transforms] == ["DecodeImage", "ConvertRGB", "Phi3ImageTransform"]
    assert all(t["operation"]["domain"] == "com.microsoft.extensions" for t in transforms)


def _io(path):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ({i.name: (i.type, i.shape) for i in sess.get_inputs()},
            {o.name: (o.type, o.shape) for o in sess.get_outputs()})


def test_onnx_io_names_and_dtypes(tiny_dir):
    names = contract.PHI3_FILE_NAMES
    cfg = _config(tiny_dir)["model"]["decoder"]
    layers, kv_heads = cfg["num_hidden_layers"], cfg["num_key_value_heads"]

    ins, outs = _io(tiny_dir / names.vision)
    # the axes Microsoft's export script declares for the release: the crop axis dynamic
    assert ins["pixel_values"][0] == "tensor(float)"
    assert ins["pixel_values"][1] == ["num_images", "max_num_crops", 3, "height", "width"]
    assert ins["image_sizes"][0] == "tensor(int64)" and ins["image_sizes"][1][1:] == [2]
    assert list(outs) == ["image_features"] and len(outs["image_features"][1]) == 2

    ins, outs = _io(tiny_dir / names.embedding)
    assert ins["input_ids"][0] == "tensor(int64)" and len(ins["input_ids"][1]) == 2
    assert ins["image_features"][0] == "tensor(float)" and ins["image_features"][1][1] == cfg["hidden_size"]
    assert list(outs) == ["inputs_embeds"] and len(outs["inputs_embeds"][1]) == 3

    ins, outs = _io(tiny_dir / names.decoder)
    expected_in = {"inputs_embeds", "attention_mask"}
    expected_in |= {f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")}
    assert set(ins) == expected_in  # no input_ids, no position_ids: like the release
    assert ins["attention_mask"][0] == "tensor(int64)"
    assert ins["past_key_values.0.key"][0] == "tensor(float)" and ins["past_key_values.0.key"][1][1] == kv_heads
    assert set(outs) == {"logits"} | {f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")}
    assert outs["logits"][1][2] == 32064


def test_decoder_graph_is_the_builders_int4_gqa(tiny_dir):
    """MatMulNBits int4 block 32 and GroupQueryAttention with rotary inside, as in the release."""
    onnx = pytest.importorskip("onnx", reason="reading the graph needs onnx (the build extra)")
    graph = onnx.load(str(tiny_dir / contract.PHI3_FILE_NAMES.decoder), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert {"MatMulNBits", "GroupQueryAttention", "If"} <= ops  # If: short/long LongRoPE cache
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            assert (attrs["bits"], attrs["block_size"], attrs.get("accuracy_level")) == (4, 32, 4)
        if node.op_type == "GroupQueryAttention":
            assert attrs["do_rotary"] == 1


def test_tokenizer_layout(tiny_dir, tiny_model):
    import onnxruntime_genai as og

    tok = og.Tokenizer(tiny_model)
    for off, content, _ in contract.ADDED_TOKENS:
        assert list(tok.encode(content)) == [contract.BASE_VOCAB_SIZE + off], content
    data = json.loads((tiny_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    assert len(vocab) == contract.BASE_VOCAB_SIZE
    assert (vocab["<unk>"], vocab["<s>"], vocab["</s>"], vocab["<0x00>"], vocab["<0xFF>"]) == (0, 1, 2, 3, 258)
    assert data["model"]["byte_fallback"] is True
    # byte fallback: text the vocab has never seen round-trips. og's decode keeps the leading "▁" as a space:
    # it does exactly that with the real Phi-3 tokenizer too (checked against og's own phi3-v test fixture).
    text = "Straße 東京 🙂"
    assert tok.decode(tok.encode(text)) == " " + text
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "LlamaTokenizer" and cfg["added_tokens_decoder"]["32007"]["content"] == "<|end|>"
    special = json.loads((tiny_dir / "special_tokens_map.json").read_text())
    assert special["bos_token"]["content"] == "<s>" and "<|end|>" in special["additional_special_tokens"]


def test_model_loads_as_phi3v(tiny_model):
    assert tiny_model.type == "phi3v"
    assert tiny_model.device_type == "CPU"
