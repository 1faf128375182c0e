"""A request's model inputs, built by the runtime (the default) or by og's own processor (`--processor og`).

og 0.18 takes generator inputs built in Python: `input_ids` int32 [1, n] (image k's placeholders are -k),
`pixel_values` [num_images, C, 3, 336, 336] in the vision model's declared dtype, `image_sizes` int64
[num_images, 2] and `num_image_tokens` int64 [1, num_images]; for equal arrays its greedy tokens equal its own
processor's (tests/inputs/test_inputs.py). The runtime's pipeline (tokens.py + pixels.py) builds them to the reference
processor's exact behaviour, with a crop budget, safe prompts, any image format, and all its work in Pillow and
numpy. C is read from the vision model's `pixel_values` input, never hard-coded: a fixed C (17 in older exports)
is padded with zero crops whatever the crop budget; a dynamic crop axis (the release's, and this project's exports)
gets only the slots the request uses, the largest 1 + rows * cols over its images, so the vision model runs
only those crops (the features and tokens equal a 17-slot run's: tests/inputs/test_crop_slots.py).

Everything here works from the package folder alone, without loading a model: the server and the batch runner
prepare requests in one process and generate in another.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phi3v_ort.package import contract
from phi3v_ort.errors import ImageError, Phi3vError, SettingError
from phi3v_ort.package.onnx_header import read_input_spec
from phi3v_ort.inputs.pixels import PreparedImage, prepare_image
from phi3v_ort.inputs.prompt import Segment, Text, render
from phi3v_ort.inputs.tokens import PromptTokenizer

DEFAULT_PROCESSOR = "own"


@dataclass
class ModelInputs:
    """What the model will see for one request: the og inputs as numpy arrays, and what they cost."""

    prompt: str  # the prompt as template text (for display; the ids are the truth)
    input_ids: np.ndarray  # int32 [1, n]
    pixel_values: np.ndarray | None  # [num_images, C, 3, 336, 336] float32/float16; None without images
    image_sizes: np.ndarray | None  # int64 [num_images, 2]
    num_image_tokens: np.ndarray | None  # int64 [1, num_images]
    preprocess_s: float  # image preparation + assembly (image decoding is counted by the caller)

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    @property
    def image_tokens(self) -> tuple[int, ...]:
        return () if self.num_image_tokens is None else tuple(int(n) for n in self.num_image_tokens.ravel())

    def to_og(self):
        """An og.NamedTensors for `Generator.set_inputs`."""
        import onnxruntime_genai as og

        named = og.NamedTensors()
        named["input_ids"] = np.ascontiguousarray(self.input_ids, dtype=np.int32)
        if self.pixel_values is not None:
            named["pixel_values"] = np.ascontiguousarray(self.pixel_values)
            named["image_sizes"] = np.ascontiguousarray(self.image_sizes, dtype=np.int64)
            named["num_image_tokens"] = np.ascontiguousarray(self.num_image_tokens, dtype=np.int64)
        return named


class InputBuilder:
    """The runtime's input pipeline for one package: tokenizer, crop budget default, the vision input's shape."""

    def __init__(self, folder: str | Path, vision_file: str):
        folder = Path(folder)
        self.tokenizer = PromptTokenizer(folder)
        spec = read_input_spec(folder / vision_file, "pixel_values")
        self.pixel_dtype = spec.dtype
        # a fixed crop dimension is what the vision model was exported with (17 in older exports); None: dynamic
        self.crop_slots = spec.shape[1] if len(spec.shape) == 5 and isinstance(spec.shape[1], int) else None

    @property
    def crop_axis(self) -> str:
        """The vision input's crop axis in words (for `phi3v-ort info`)."""
        return str(self.crop_slots) if self.crop_slots is not None else "crops used"

    def slots_for(self, used: int) -> int:
        """Crop slots to feed when the request's largest image uses `used` (1 + rows * cols): all of a fixed axis,
        just those of a dynamic one (CLIP runs on every slot, padding included: 2 slots instead of 17 cut the
        vision model's time 5.9x on `small`, benchmarks/results/crop-slots-cpu-small.md)."""
        return self.crop_slots if self.crop_slots is not None else used

    def check_crops(self, num_crops: int) -> None:
        if not 1 <= num_crops <= contract.MAX_CROPS:
            raise SettingError(f"the crop budget must be 1 to {contract.MAX_CROPS}, got {num_crops}")
        if self.crop_slots is not None and num_crops + 1 > self.crop_slots:
            raise SettingError(f"this package's vision model takes {self.crop_slots} crops per image, so the "
                               f"crop budget can be at most {self.crop_slots - 1}")

    def prepare_image(self, image, num_crops: int = contract.MAX_CROPS) -> PreparedImage:
        """An ImageInput -> its crops (the expensive part; runs in any thread or process)."""
        self.check_crops(num_crops)
        return prepare_image(image.image, num_crops, image.source)

    def build(self, segments: Sequence[Segment], images: Sequence[PreparedImage],
              ids: np.ndarray | None = None) -> ModelInputs:
        """Prompt segments + prepared images (image k is images[k - 1]) -> the model's inputs. `ids`: the segments'
        ids when the caller has already tokenized them (they are not tokenized again)."""
        started = time.perf_counter()
        if ids is None:
            ids = self.tokenizer.encode(segments, [img.tokens for img in images])
        ids = np.asarray(ids, dtype=np.int32).reshape(1, -1)
        if not images:
            return ModelInputs(render(segments), ids, None, None, None, time.perf_counter() - started)
        slots = self.slots_for(max(len(img.crops) for img in images))
        pixels = np.empty((len(images), slots, 3, contract.CROP_SIZE, contract.CROP_SIZE), dtype=self.pixel_dtype)
        for k, img in enumerate(images):
            if len(img.crops) > slots:
                raise Phi3vError(f"image {img.source or k + 1} has {len(img.crops)} crops but the vision model "
                                 f"takes {slots}")
            pixels[k, : len(img.crops)] = img.crops
            pixels[k, len(img.crops):] = 0  # unused crop slots are zero, as the reference pads them
        sizes = np.array([img.size for img in images], dtype=np.int64)
        counts = np.array([[img.tokens for img in images]], dtype=np.int64)
        return ModelInputs(render(segments), ids, pixels, sizes, counts,
                           time.perf_counter() - started + sum(img.prepare_s for img in images))


@dataclass(frozen=True)
class OgImage:
    """An image for og's own processor: PNG or JPEG bytes (what crosses to a worker process)."""

    source: str
    data: bytes

    def og_bytes(self) -> bytes:
        return self.data


class OwnPipeline:
    """The default: the reference processor's behaviour, built by the runtime (works without a loaded model)."""

    name = "own"

    def __init__(self, builder: InputBuilder, crops: int = contract.MAX_CROPS):
        builder.check_crops(crops)
        self.builder, self.crops = builder, crops

    def prepare_image(self, image) -> PreparedImage:
        return self.builder.prepare_image(image, self.crops)

    def image_tokens(self, image: PreparedImage) -> int:
        return image.tokens

    def inputs(self, segments: Sequence[Segment], images: Sequence[PreparedImage], model=None,
               ids: np.ndarray | None = None) -> ModelInputs:
        """The model's inputs; `ids`: the segments' ids, when the caller has already tokenized them."""
        return self.builder.build(segments, images, ids)


OG_MAX_SIDE = 16384  # og 0.18's decoder: "PNG dimensions exceed maximum allowed size" beyond (measured)


class OgPipeline:
    """`--processor og`: og 0.18's own processor, for comparison. It ignores the crop budget (always 16), adds no
    BOS, antialiases the global view, and would read control-token strings in people's text as control tokens,
    so such text is refused here rather than passed on."""

    name = "og"

    def __init__(self, builder: InputBuilder, crops: int = contract.MAX_CROPS):
        if crops != contract.MAX_CROPS:
            raise SettingError(f"og's processor always uses {contract.MAX_CROPS} crops: --crops needs the runtime's "
                               "own processor (drop --processor og)")
        self.builder, self.crops = builder, crops

    def prepare_image(self, image) -> OgImage:
        contract.check_hd_shape(image.width, image.height, self.crops, image.source)
        if max(image.width, image.height) > OG_MAX_SIDE:
            raise ImageError(f"image {image.source} is {image.width}x{image.height} pixels: og's image decoder reads "
                             f"at most {OG_MAX_SIDE} pixels a side (the runtime's own processor reads it: drop "
                             f"--processor og)")
        return OgImage(image.source, image.og_bytes())

    def image_tokens(self, image: OgImage) -> int:
        from phi3v_ort.inputs.images import decode

        img, _ = decode(image.data, image.source)
        return contract.image_tokens_for(img.width, img.height)

    def inputs(self, segments: Sequence[Segment], images: Sequence[OgImage], model=None,
               ids: np.ndarray | None = None) -> ModelInputs:
        """og's processor tokenizes the prompt itself: `ids` (the runtime's tokenization) do not apply to it."""
        if model is None:
            raise Phi3vError("og's processor runs only where the model is loaded")
        for seg in segments:
            if isinstance(seg, Text):
                found = self.builder.tokenizer.control_strings_in(seg.text)
                if found:
                    raise Phi3vError(f"the text contains {found[0]}, which og's processor would read as a control "
                                     "token: use the runtime's own processor (drop --processor og)")
        return og_processor_inputs(model.processor, segments, images, model.tokenizer)


def make_pipeline(builder: InputBuilder, processor: str = DEFAULT_PROCESSOR, crops: int | None = None):
    """The one place a request's input pipeline is chosen."""
    crops = contract.MAX_CROPS if crops is None else crops
    if processor == "own":
        return OwnPipeline(builder, crops)
    if processor == "og":
        return OgPipeline(builder, crops)
    raise SettingError(f"unknown processor {processor!r}: choose own or og")


def og_processor_inputs(processor, segments: Sequence[Segment], images: Sequence, tokenizer=None) -> ModelInputs:
    """og's processor on the prompt as text and the images as PNG/JPEG bytes."""
    import onnxruntime_genai as og

    started = time.perf_counter()
    prompt = render(segments, decode=tokenizer.decode if tokenizer is not None else None)
    og_images = og.Images.open_bytes(*[img.og_bytes() for img in images]) if images else None
    result = processor(prompt, images=og_images)
    arrays = {name: result[name].as_numpy() for name in result.keys()}
    ids = np.asarray(arrays["input_ids"], dtype=np.int32).reshape(1, -1)
    if not images:
        return ModelInputs(prompt, ids, None, None, None, time.perf_counter() - started)
    counts = np.array([[int((ids == -(k + 1)).sum()) for k in range(len(images))]], dtype=np.int64)
    # og's own int64 arrays come back with a dtype its setter rejects ("Unsupported numpy type"): rebuild them
    sizes = np.array(arrays["image_sizes"].tolist(), dtype=np.int64).reshape(-1, 2)
    return ModelInputs(prompt, ids, arrays["pixel_values"], sizes, counts, time.perf_counter() - started)
