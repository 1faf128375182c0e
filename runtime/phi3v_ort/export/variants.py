"""The release's variants: what `--variant` means for each of the three models.

| variant  | decoder (the model builder, then quantize.py for int4) | vision / embedding I/O | release folder                        |
|----------|--------------------------------------------------------|------------------------|---------------------------------------|
| gpu-int4 | int4 RTN block 32, CUDA (built fp16, then quantized)   | fp16                   | gpu/gpu-int4-rtn-block-32             |
| cpu-int4 | int4 RTN block 32, accuracy level 4, CPU (built fp32)  | fp32                   | cpu/cpu-int4-rtn-block-32-acc-level-4 |
| gpu-fp16 | fp16, CUDA                                             | fp16                   | (the legacy cuda-fp16)                |
| cpu-fp32 | fp32, CPU                                              | fp32                   | (none: the exact one, for checking)   |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str  # the builder's -p: int4, fp16, fp32
    provider: str  # the builder's -e: cpu, cuda

    @property
    def io_float16(self) -> bool:
        """The GPU builds run fp16 I/O everywhere; the CPU builds fp32."""
        return self.provider == "cuda"

    @property
    def builder_precision(self) -> str:
        """What the model builder is run with: int4 variants are built in their float I/O type and quantized
        afterwards, one weight at a time (quantize.py: the builder's own int4 path holds the model twice)."""
        if self.precision == "int4":
            return "fp16" if self.io_float16 else "fp32"
        return self.precision

    @property
    def accuracy_level(self) -> int | None:
        """MatMulNBits' accuracy level: 4 on the CPU, as the release's "cpu-int4-rtn-block-32-acc-level-4"."""
        return 4 if self.precision == "int4" and self.provider == "cpu" else None


INT4_BLOCK_SIZE = 32  # "rtn-block-32"


VARIANTS = {v.name: v for v in (
    Variant("gpu-int4", "int4", "cuda"),
    Variant("cpu-int4", "int4", "cpu"),
    Variant("gpu-fp16", "fp16", "cuda"),
    Variant("cpu-fp32", "fp32", "cpu"),
)}
DEFAULT_VARIANT = "cpu-int4"
