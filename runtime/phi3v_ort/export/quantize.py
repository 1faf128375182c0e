"""int4 RTN weight quantization of a saved decoder, one weight at a time: what onnxruntime-genai's builder does for
`-p int4`, without holding the model twice.

The builder's int4 path (0.18) builds the float graph, materialises the whole model as one in-memory ModelProto
(every weight in float32 for the CPU build: 15 GB for Phi-3-vision) while it still holds the torch model, and only
then quantizes it with onnxruntime's MatMulNBitsQuantizer: 22 GB resident for the full model, measured. The
exporter therefore has the builder save the float decoder (it streams its weights to disk one at a time), and
this module rewrites that file into the int4 one, weight by weight:

    every MatMul whose weight B [K, N] is a 2-D initializer  ->  MatMulNBits(A, B_Q4, B_scales)
                                                                   K, N, bits=4, block_size, accuracy_level

The numbers are onnxruntime's own: `DefaultWeightOnlyQuantizer.qbits_block_quant` (the MLAS kernel the builder's
quantizer calls, symmetric blocks, QOperator format), and the nodes and initializers are named and laid out as
that quantizer names them, so the result equals the builder's own int4 output byte for byte
(tests/export/test_export_quantize.py compares them on a tiny model, CPU and CUDA variants). Memory: the largest weight,
twice (the lm_head: 394 MB in float32).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

BITS = 4


def _external(tensor) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _read(tensor, folder: Path) -> np.ndarray:
    """An initializer's values from its external data file (memory-mapped, read once)."""
    from onnx import helper

    info = _external(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    offset = int(info.get("offset", 0))
    array = np.memmap(folder / info["location"], dtype=dtype, mode="r", offset=offset, shape=(count,))
    return np.array(array).reshape(tuple(tensor.dims))


class _ExternalData:
    """The output's `.data` file: tensors appended one at a time, each pointed at its bytes."""

    def __init__(self, data, data_name: str):
        self.data, self.data_name = data, data_name
        self.written: list = []

    def append(self, tensor, raw: bytes) -> None:
        from onnx import TensorProto

        offset = self.data.tell()
        self.data.write(raw)
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        for key, value in (("location", self.data_name), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = TensorProto.EXTERNAL
        self.written.append(tensor)


def quantize_int4(src: Path, dst: Path, block_size: int = 32, accuracy_level: int | None = None) -> int:
    """Write `dst` (+ `dst.data`): `src` (+ its external data) with every MatMul's constant 2-D weight quantized to
    int4. Returns how many MatMuls were quantized."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                  DefaultWeightOnlyQuantizer)
    from onnxruntime.quantization.quant_utils import QuantFormat

    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, quant_format=QuantFormat.QOperator,
        op_types_to_quantize=("MatMul",), bits=BITS))
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    data_name = dst.name + ".data"
    with open(dst.with_name(data_name), "wb") as data:
        out = _ExternalData(data, data_name)
        new_nodes, weights_done, quantized = _quantize_nodes(graph, src.parent, out, quantizer, block_size,
                                                             accuracy_level)
        kept = _copy_initializers(graph, src.parent, out, weights_done, new_nodes)
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + out.written)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, dst)
    return quantized


def _quantize_nodes(graph, folder: Path, out: _ExternalData, quantizer, block_size: int,
                    accuracy_level: int | None) -> tuple[list, dict, int]:
    """The graph's nodes with every MatMul of a constant 2-D float weight replaced by MatMulNBits (each weight
    quantized once, also when several MatMuls share it)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    weights_done: dict[str, tuple[str, str, int, int]] = {}
    new_nodes = []
    quantized = 0
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if weight is None or len(weight.dims) != 2 or weight.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            new_nodes.append(node)
            continue
        if weight.name not in weights_done:
            values = _read(weight, folder)
            packed, scales, _ = quantizer.qbits_block_quant(values)
            rows, cols = values.shape
            del values
            q = numpy_helper.from_array(packed, weight.name + f"_Q{BITS}")
            s = numpy_helper.from_array(scales, weight.name + "_scales")
            out.append(q, packed.tobytes())
            out.append(s, scales.tobytes())
            weights_done[weight.name] = (q.name, s.name, rows, cols)
        q_name, s_name, rows, cols = weights_done[weight.name]
        attrs = {"K": rows, "N": cols, "bits": BITS, "block_size": block_size}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        new_nodes.append(onnx.helper.make_node(
            "MatMulNBits", inputs=[node.input[0], q_name, s_name], outputs=[node.output[0]],
            name=node.name + f"_Q{BITS}" if node.name else "", domain="com.microsoft", **attrs))
        quantized += 1
    return new_nodes, weights_done, quantized


def _copy_initializers(graph, folder: Path, out: _ExternalData, weights_done: dict, new_nodes: list) -> list:
    """Every other initializer, copied over as it is (a weight still used by another node stays too): external ones
    into the new `.data` file, inline ones returned."""
    from onnx import TensorProto

    used = {name for n in new_nodes for name in n.input}
    kept = []
    for tensor in graph.initializer:
        if tensor.name in weights_done and tensor.name not in used:
            continue
        copy = TensorProto()
        copy.CopyFrom(tensor)
        if tensor.data_location == TensorProto.EXTERNAL:
            out.append(copy, _read(tensor, folder).tobytes())
        else:
            kept.append(copy)
    return kept
