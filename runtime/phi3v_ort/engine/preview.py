"""What the model would see for a request, without generating (`phi3v-ort prepare`, `Model.prepare`).

The runtime's own pipeline needs only the package's files (tokenizer, configs, the vision model's declared input),
not its weights; og's processor exists only inside a loaded model, so `processor="og"` loads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from phi3v_ort.engine.generation import prepare
from phi3v_ort.inputs.images import ImageInput
from phi3v_ort.inputs.pipeline import ModelInputs, make_pipeline
from phi3v_ort.inputs.prompt import build_prompt
from phi3v_ort.engine.model import load_model
from phi3v_ort.package.loading import open_inputs, read_package


def preview(folder: str | Path, question: str, images: Sequence[ImageInput] = (), system: str | None = None,
            processor: str = "own", crops: int | None = None, device: str = "auto") -> ModelInputs:
    """The model's inputs for `question` about `images`, built by the chosen processor."""
    if processor == "og":
        return prepare(load_model(folder, device=device), question, images, system, "og", crops)
    pipeline = make_pipeline(open_inputs(read_package(folder, inputs_only=True)), processor, crops)
    return pipeline.inputs(build_prompt(question, len(images), system), [pipeline.prepare_image(i) for i in images])


def preview_dict(inputs: ModelInputs) -> dict:
    """`prepare --json`'s object: prompt, input_ids, image_sizes, num_image_tokens, prompt_tokens."""
    sizes = inputs.image_sizes.tolist() if inputs.image_sizes is not None else []
    return {"prompt": inputs.prompt, "input_ids": inputs.input_ids[0].tolist(), "image_sizes": sizes,
            "num_image_tokens": list(inputs.image_tokens), "prompt_tokens": inputs.prompt_tokens}
