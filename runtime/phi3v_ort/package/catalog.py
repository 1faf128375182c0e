"""The known published builds of Phi-3-vision, in one place: repo, folder, expected files, note.

Names and folders come from the hub's listings (see shared/docs/phi3v-release-contract.md). The fetcher still
confirms each folder against the hub's live file list at fetch time; the expected files here are what a
complete folder must hold (genai_config.json names the models, so the ONNX files are checked from it too).
"""

from __future__ import annotations

from dataclasses import dataclass

from phi3v_ort.package import contract
from phi3v_ort.errors import Phi3vError

DEFAULT_MODEL = "phi-3-vision"
VARIANTS = ("gpu-int4", "cpu-int4")
MODEL_ENV = "PHI3V_ORT_MODEL"


@dataclass(frozen=True)
class Variant:
    model: str
    name: str  # "gpu-int4" / "cpu-int4", or a legacy build's name
    repo: str
    folder: str
    files: tuple[str, ...]
    note: str
    legacy: bool = False

    @property
    def label(self) -> str:
        return f"{self.model}:{self.name}"


def _files(names: contract.FileNames) -> tuple[str, ...]:
    models = (names.vision, names.embedding, names.decoder)
    return contract.SIDE_FILES + models + tuple(f + ".data" for f in models)


PHI3 = "microsoft/Phi-3-vision-128k-instruct-onnx"
PHI35 = "microsoft/Phi-3.5-vision-instruct-onnx"
LEGACY = "microsoft/Phi-3-vision-128k-instruct-onnx-cuda"

CATALOG: tuple[Variant, ...] = (
    Variant("phi-3-vision", "gpu-int4", PHI3, "gpu/gpu-int4-rtn-block-32", _files(contract.PHI3_FILE_NAMES),
            "int4 RTN block 32, fp16 I/O, CUDA; decoder ~2.1 GB"),
    Variant("phi-3-vision", "cpu-int4", PHI3, "cpu/cpu-int4-rtn-block-32-acc-level-4",
            _files(contract.PHI3_FILE_NAMES), "int4 RTN block 32, accuracy level 4, CPU; decoder ~2.3 GB"),
    Variant("phi-3.5-vision", "gpu-int4", PHI35, "gpu/gpu-int4-rtn-block-32", _files(contract.PHI35_FILE_NAMES),
            "int4 RTN block 32, fp16 I/O, CUDA; decoder ~2.1 GB"),
    Variant("phi-3.5-vision", "cpu-int4", PHI35, "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4",
            _files(contract.PHI35_FILE_NAMES), "int4 RTN block 32, accuracy level 4, CPU; decoder ~2.3 GB"),
    Variant("phi-3-vision", "cuda-int4-legacy", LEGACY, "cuda-int4-rtn-block-32", (),
            f"legacy format (vision output 'visual_features'): onnxruntime-genai >= 0.5 cannot run it; use {PHI3}",
            legacy=True),
    Variant("phi-3-vision", "cuda-fp16-legacy", LEGACY, "cuda-fp16", (),
            f"legacy format fp16 build (7.45 GB): onnxruntime-genai >= 0.5 cannot run it; use {PHI3}", legacy=True),
)

MODELS = tuple(dict.fromkeys(v.model for v in CATALOG))


def find_variant(model: str, variant: str) -> Variant:
    """The catalog entry for a model name and variant, or one sentence saying what exists."""
    if model not in MODELS:
        raise Phi3vError(f"unknown model {model!r}: the catalog has {', '.join(MODELS)} "
                         "(or pass --model-dir with a folder)")
    for v in CATALOG:
        if v.model == model and v.name == variant:
            if v.legacy:
                raise Phi3vError(f"{v.label} ({v.repo}/{v.folder}) is refused: {v.note}")
            return v
    names = ", ".join(v.name for v in CATALOG if v.model == model and not v.legacy)
    raise Phi3vError(f"unknown variant {variant!r} of {model}: choose one of {names}")


def input_files(variant: Variant) -> tuple[str, ...]:
    """What the runtime's input pipeline reads of a variant's folder: the configs, the tokenizer and the vision
    model's graph (its pixel_values shape and dtype; the weights are in the .onnx.data beside it)."""
    vision = next(n.vision for n in (contract.PHI3_FILE_NAMES, contract.PHI35_FILE_NAMES) if n.vision in variant.files)
    return (*contract.SIDE_FILES, vision)


def default_variant(device: str) -> str:
    """GPU int4 when the model will run on CUDA, CPU int4 otherwise."""
    return "gpu-int4" if device == "cuda" else "cpu-int4"


def select(name: str, variant: str | None, device: str) -> Variant:
    """A catalog entry from a name like `phi-3-vision` or `phi-3-vision:cpu-int4`; with no variant named, the one
    for the device the model will run on."""
    base, _, pinned = name.partition(":")
    return find_variant(base, variant or pinned or default_variant(device))
