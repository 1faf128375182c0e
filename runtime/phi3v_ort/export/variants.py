"""The release's variants: what `--variant` means for each of the three models.

| variant  | decoder (onnxruntime-genai's model builder)        | vision / embedding I/O | release folder                         |
|----------|----------------------------------------------------|------------------------|----------------------------------------|
| gpu-int4 | int4 RTN block 32, CUDA                            | fp16                   | gpu/gpu-int4-rtn-block-32              |
| cpu-int4 | int4 RTN block 32, accuracy level 4, CPU           | fp32                   | cpu/cpu-int4-rtn-block-32-acc-level-4  |
| gpu-fp16 | fp16, CUDA                                         | fp16                   | (the legacy cuda-fp16)                 |
| cpu-fp32 | fp32, CPU                                          | fp32                   | (none: the exact one, for validation)  |
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

    def builder_options(self) -> list[str]:
        """The builder's --extra_options for this variant's decoder (beyond file name and exclude_embeds)."""
        if self.precision != "int4":
            return []
        options = ["int4_block_size=32"]
        if self.provider == "cpu":
            options.append("int4_accuracy_level=4")  # the CPU release is "cpu-int4-rtn-block-32-acc-level-4"
        return options


VARIANTS = {v.name: v for v in (
    Variant("gpu-int4", "int4", "cuda"),
    Variant("cpu-int4", "int4", "cpu"),
    Variant("gpu-fp16", "fp16", "cuda"),
    Variant("cpu-fp32", "fp32", "cpu"),
)}
DEFAULT_VARIANT = "cpu-int4"
