"""Read one graph input's dtype and shape from an .onnx file without loading the model.

The input pipeline must know the vision model's `pixel_values` shape (its crop dimension) and dtype (float32 on
the CPU build, float16 on the GPU build) in processes that never load a model. Loading the file in onnxruntime
costs its weights; the `onnx` package is a large dependency for three fields. This walks the protobuf directly,
skipping everything else with seeks: ModelProto.graph (7) -> GraphProto.input (11) -> ValueInfoProto {name (1),
type (2) -> TypeProto.tensor_type (1) -> {elem_type (1), shape (2) -> dim (1) -> {dim_value (1), dim_param (2)}}}.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phi3v_ort.errors import Phi3vError

# TensorProto.DataType values the vision model may declare
ONNX_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64, 7: np.int64, 6: np.int32}
# og 0.18 also accepts bfloat16 vision models; numpy has no bfloat16, so such a package needs --processor og
BFLOAT16 = 16


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: type
    shape: tuple[int | str, ...]  # ints for fixed dimensions, names for symbolic ones


def read_input_spec(path: Path, name: str) -> InputSpec:
    """The declared dtype and shape of graph input `name`."""
    try:
        with open(path, "rb") as f:
            for field, value in _fields(f, _size(f)):
                if field == 7:  # graph
                    spec = _graph_input(f, value, name)
                    if spec is not None:
                        return spec
    except (OSError, ValueError, EOFError) as exc:
        raise Phi3vError(f"cannot read the inputs of {path} ({exc})") from None
    raise Phi3vError(f"{path.name} has no input named {name}")


def _size(f) -> int:
    f.seek(0, io.SEEK_END)
    end = f.tell()
    f.seek(0)
    return end


def _varint(f) -> int:
    result, shift = 0, 0
    while True:
        byte = f.read(1)
        if not byte:
            raise EOFError("truncated protobuf")
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7


def _fields(f, end: int):
    """Yield (field number, value) until `end`: varints as ints; length-delimited fields as their end offset with
    the file positioned at their start (a consumer that does not read them is skipped past them)."""
    while f.tell() < end:
        key = _varint(f)
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, _varint(f)
        elif wire == 2:
            length = _varint(f)
            start = f.tell()
            yield field, start + length
            f.seek(start + length)
        elif wire == 1:
            f.seek(8, io.SEEK_CUR)
        elif wire == 5:
            f.seek(4, io.SEEK_CUR)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _graph_input(f, end: int, name: str) -> InputSpec | None:
    for field, value in _fields(f, end):
        if field == 11:  # input: ValueInfoProto
            found, elem, shape = None, None, []
            for vfield, vvalue in _fields(f, value):
                if vfield == 1:
                    found = f.read(vvalue - f.tell()).decode("utf-8")
                elif vfield == 2:  # TypeProto
                    for tfield, tvalue in _fields(f, vvalue):
                        if tfield == 1:  # tensor_type
                            elem, shape = _tensor_type(f, tvalue)
            if found == name:
                if elem == BFLOAT16:
                    raise ValueError(f"{name} is bfloat16, which only --processor og can feed")
                if elem not in ONNX_DTYPES:
                    raise ValueError(f"{name} has an unsupported element type {elem}")
                return InputSpec(name, ONNX_DTYPES[elem], tuple(shape))
    return None


def _tensor_type(f, end: int) -> tuple[int | None, list[int | str]]:
    elem, shape = None, []
    for field, value in _fields(f, end):
        if field == 1:
            elem = value
        elif field == 2:  # TensorShapeProto
            for sfield, svalue in _fields(f, value):
                if sfield == 1:  # Dimension
                    dim: int | str = "?"
                    for dfield, dvalue in _fields(f, svalue):
                        if dfield == 1:
                            dim = dvalue
                        elif dfield == 2:
                            dim = f.read(dvalue - f.tell()).decode("utf-8")
                    shape.append(dim)
    return elem, shape
