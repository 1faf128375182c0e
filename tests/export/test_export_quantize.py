"""export.quantize: the exporter's weight-by-weight int4 pass equals onnxruntime-genai's own `-p int4` decoder, byte
for byte (graph, attributes, every initializer), for the CPU release (accuracy level 4) and the CUDA one (fp16)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_build

pytestmark = [needs_build, pytest.mark.build, pytest.mark.synthetic("tiny-fp32-cpu")]


def _builder(src: Path, out: Path, precision: str, provider: str, *extra: str) -> Path:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", precision,
           "-e", provider, "-c", str(out.parent / "cache"), "--extra_options", "exclude_embeds=true",
           "filename=decoder.onnx", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "decoder.onnx"


def _nodes(model) -> list:
    import onnx

    return [(n.op_type, n.domain, n.name, list(n.input), list(n.output),
             sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute)) for n in model.graph.node]


@pytest.mark.parametrize("variant", ["cpu-int4", "gpu-int4"])
def test_weight_by_weight_int4_equals_the_builders_own(synthetic, tmp_path, variant):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from phi3v_ort.export.checkpoint import Checkpoint
    from phi3v_ort.export.decoder import stage_decoder
    from phi3v_ort.export.quantize import quantize_int4
    from phi3v_ort.export.variants import INT4_BLOCK_SIZE, VARIANTS

    v = VARIANTS[variant]
    package = synthetic.get("tiny-fp32-cpu")
    stage_decoder(Checkpoint.open(package.with_name(package.name + ".checkpoint")), tmp_path / "hf")
    extra = ["int4_block_size=32"] + (["int4_accuracy_level=4"] if v.provider == "cpu" else [])
    theirs_path = _builder(tmp_path / "hf", tmp_path / "og", "int4", v.provider, *extra)
    floating = _builder(tmp_path / "hf", tmp_path / "float", v.builder_precision, v.provider)
    ours_path = tmp_path / "ours" / "decoder.onnx"
    ours_path.parent.mkdir()
    assert quantize_int4(floating, ours_path, INT4_BLOCK_SIZE, v.accuracy_level) == 2 * 5 + 1  # qkv, o, gate, up, down in 2 layers + lm_head

    theirs, ours = onnx.load(str(theirs_path)), onnx.load(str(ours_path))
    assert _nodes(ours) == _nodes(theirs)
    nbits = [n for n in _nodes(ours) if n[0] == "MatMulNBits"]
    assert nbits and all(("accuracy_level", 4) in n[5] for n in nbits) == (v.provider == "cpu")
    assert ours.graph.input == theirs.graph.input and ours.graph.output == theirs.graph.output
    assert [(o.domain, o.version) for o in ours.opset_import] == [(o.domain, o.version) for o in theirs.opset_import]
    a = {t.name: numpy_helper.to_array(t, base_dir=str(theirs_path.parent)) for t in theirs.graph.initializer}
    b = {t.name: numpy_helper.to_array(t, base_dir=str(ours_path.parent)) for t in ours.graph.initializer}
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name]), name
    assert json.loads((tmp_path / "og" / "genai_config.json").read_text()) == \
        json.loads((tmp_path / "float" / "genai_config.json").read_text())
