"""The published Phi-3-vision ONNX release's contract, in one place.

Everything here is read from the release (see shared/docs/phi3v-release-contract.md):
the synthetic-package builder writes it, the tests check packages against it, and the
runtime relies on it. Nothing in this module imports onnxruntime-genai or torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# -- image geometry (the reference Phi3VImageProcessor; og 0.18's Phi3ImageTransform is fixed at 16 crops)
CROP_SIZE = 336
MAX_CROPS = 16  # the release's num_crops, and the most a request may ask for
TOKENS_PER_CROP = 144  # (336 / 14 / 2) ** 2: 24x24 patches merged 2x2
NEWLINE_TOKENS_PER_ROW = 12  # one separator after each of the 12 token rows of a crop row
# crop slots of og's processor (always) and of a vision model exported with a fixed crop axis: the global crop,
# then up to 16 sub-crops; a dynamic crop axis (the release's) takes only the slots a request uses
PIXEL_CROPS = MAX_CROPS + 1


def hd_scale(width: int, height: int, num_crops: int = MAX_CROPS) -> tuple[int, int]:
    """(resized long side, resized short side) before padding: the largest `scale` with
    scale * ceil(scale / ratio) <= num_crops (ratio = long / short side); long = 336 * scale, short = int(long / ratio).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 1 <= num_crops <= MAX_CROPS:
        raise ValueError(f"num_crops must be in 1..{MAX_CROPS}, got {num_crops}")
    long_side, short_side = max(width, height), min(width, height)
    ratio = long_side / short_side
    scale = 1
    while (scale + 1) * math.ceil((scale + 1) / ratio) <= num_crops:
        scale += 1
    new_long = CROP_SIZE * scale
    new_short = int(new_long / ratio)
    if new_short == 0:  # the reference's resize fails on a zero size: callers refuse first (check_hd_shape)
        raise ValueError(f"a {width}x{height} image has no short side after the HD resize at {num_crops} crops")
    return new_long, new_short


def check_hd_shape(width: int, height: int, num_crops: int, label: str) -> None:
    """Refuse, in one sentence naming the image, a shape the HD resize flattens to nothing: the short side becomes
    int(336 * scale / ratio) pixels, 0 once the long side is more than 336 * num_crops times the short one (6000x1;
    400x1 at 1 crop). The reference Phi3VImageProcessor fails on those (a resize to a zero size), and so does og
    0.18's processor ("[hd_transform]: Failed to allocate memory": 5376x1 works, 5377x1 fails)."""
    from phi3v_ort.errors import ImageError

    long_side, short_side = max(width, height), min(width, height)
    if short_side > 0 and int(CROP_SIZE * num_crops / (long_side / short_side)) > 0:
        return
    most = CROP_SIZE * num_crops
    raise ImageError(f"the model cannot take image {label}: it is {width}x{height} pixels, too narrow for the HD "
                     f"resize at {num_crops} crop{'s' if num_crops != 1 else ''} (its long side may be at most "
                     f"{most:,} times its short side)")


def hd_size(width: int, height: int, num_crops: int = MAX_CROPS) -> tuple[int, int]:
    """(h, w) of an image after Phi-3-V's HD resize and white padding (the short side up to a multiple of 336),
    as the processor reports it in `image_sizes`."""
    new_long, new_short = hd_scale(width, height, num_crops)
    padded_short = math.ceil(new_short / CROP_SIZE) * CROP_SIZE
    if width < height:
        return new_long, padded_short  # (h, w): the height was the long side
    return padded_short, new_long


def image_token_count(h: int, w: int) -> int:
    """Image tokens for an HD-resized (h, w): sub-crops + their row separators, the global separator,
    the global crop + its 12 row separators."""
    rows, cols = h // CROP_SIZE, w // CROP_SIZE
    return (rows * cols + 1) * TOKENS_PER_CROP + 1 + (rows + 1) * NEWLINE_TOKENS_PER_ROW


def image_tokens_for(width: int, height: int, num_crops: int = MAX_CROPS) -> int:
    """Image tokens for an image of the given pixel size and crop budget."""
    return image_token_count(*hd_size(width, height, num_crops))


# -- tokenizer layout: Llama-style BPE with byte fallback, 32000 base ids, then added tokens
UNK, BOS, EOS_TEXT = "<unk>", "<s>", "</s>"
BASE_VOCAB_SIZE = 32000
ADDED_VOCAB_SIZE = 64  # the model's vocab is the base plus 64 ids (not all of them named)
VOCAB_SIZE = BASE_VOCAB_SIZE + ADDED_VOCAB_SIZE
# Named added tokens, by offset from the end of the base vocab, exactly as the release lists them.
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    # (offset, content, rstrip)
    (0, "<|endoftext|>", False),
    (1, "<|assistant|>", True),
    (2, "<|placeholder1|>", True),
    (3, "<|placeholder2|>", True),
    (4, "<|placeholder3|>", True),
    (5, "<|placeholder4|>", True),
    (6, "<|system|>", False),
    (7, "<|end|>", False),
    (8, "<|placeholder5|>", True),
    (9, "<|placeholder6|>", True),
    (10, "<|user|>", False),
    *((10 + k, f"<|placeholder{6 + k}|>", True) for k in range(1, 34)),
    (44, "<|image|>", False),
)
BOS_TOKEN_ID = 1
PAD_TOKEN_ID = BASE_VOCAB_SIZE + 0  # <|endoftext|>
EOS_TOKEN_ID = BASE_VOCAB_SIZE + 7  # <|end|>: the chat model's end of turn
CONTEXT_LENGTH = 131072
ORIGINAL_CONTEXT_LENGTH = 4096

# -- the three ONNX components and their I/O names (genai_config.json, type "phi3v")
MODEL_TYPE = "phi3v"
LEGACY_VISION_OUTPUT = "visual_features"  # the first (pre-0.5) format: og rejects it


@dataclass(frozen=True)
class FileNames:
    vision: str
    embedding: str
    decoder: str


PHI3_FILE_NAMES = FileNames(
    vision="phi-3-v-128k-instruct-vision.onnx",
    embedding="phi-3-v-128k-instruct-text-embedding.onnx",
    decoder="phi-3-v-128k-instruct-text.onnx",
)
PHI35_FILE_NAMES = FileNames(
    vision="phi-3.5-v-instruct-vision.onnx",
    embedding="phi-3.5-v-instruct-embedding.onnx",
    decoder="phi-3.5-v-instruct-text.onnx",
)

DECODER_INPUTS = {
    "inputs_embeds": "inputs_embeds",
    "attention_mask": "attention_mask",
    "past_key_names": "past_key_values.%d.key",
    "past_value_names": "past_key_values.%d.value",
}
DECODER_OUTPUTS = {
    "logits": "logits",
    "present_key_names": "present.%d.key",
    "present_value_names": "present.%d.value",
}
EMBEDDING_INPUTS = {"input_ids": "input_ids", "image_features": "image_features"}
EMBEDDING_OUTPUTS = {"inputs_embeds": "inputs_embeds"}
VISION_INPUTS = {"pixel_values": "pixel_values", "image_sizes": "image_sizes"}
VISION_OUTPUTS = {"image_features": "image_features"}

# The tokenizer files of a checkpoint and of every variant folder (copied from the checkpoint).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# The other files every variant folder carries beside the three models.
SIDE_FILES = ("genai_config.json", "processor_config.json", *TOKENIZER_FILES)

# Chat template of the tokenizer_config.json the release ships.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{- '<|assistant|>\n' -}}{% endif %}"
)
