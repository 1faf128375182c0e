"""One decoded image -> the vision model's crops, exactly as the reference Phi3VImageProcessor makes them.

The recipe (shared/reference/README.md): transpose to landscape when taller than wide; resize with Pillow's
bilinear filter (what torchvision's resize does to a PIL image) so the width is 336 * scale, the largest scale with
scale * ceil(scale / ratio) <= num_crops; pad top and bottom with white to a multiple of 336; transpose back;
normalise with CLIP's mean and std; the global view is the normalised image resized to 336x336 by torch-style
bicubic WITHOUT antialias (og 0.18's processor antialiases it: up to 1.79 apart); crops = [global] + the tiles
row by row.

Everything runs in Pillow and numpy, so it needs no model and runs in any process: the server and the batch
runner prepare in their own process while worker processes generate (og 0.18 holds the GIL for a whole prefill
and most of each decode step, so threads beside og in ONE process get almost nothing: measured in
benchmarks/results/input-pipeline-cpu-small.md). Normalisation is a 256-entry lookup per channel computed with
the reference's float32 arithmetic, so the sub-crops are the reference's values bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from phi3v_ort.package import contract

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC_A = -0.75  # torch's cubic convolution constant
S = contract.CROP_SIZE

# (x / 255 - mean) / std in float32, as torchvision's ToTensor + Normalize compute it, for every byte value.
_LUT = np.stack([(np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(m)) / np.float32(s)
                 for m, s in zip(CLIP_MEAN, CLIP_STD)])


@dataclass(frozen=True)
class PreparedImage:
    """An image as the vision model takes it: only the crops it uses (padding to the model's crop count
    happens when a request's inputs are assembled, so these stay small when they cross a process boundary)."""

    crops: np.ndarray  # float32 [1 + rows * cols, 3, 336, 336]: the global view, then the tiles row by row
    size: tuple[int, int]  # (h, w) after the HD resize and padding: the model's `image_sizes`
    tokens: int  # placeholder tokens this image takes in the prompt
    num_crops: int  # the crop budget it was prepared with
    source: str
    prepare_s: float  # HD transform + normalisation (decoding is the image loader's time)


def prepare_image(image: Image.Image, num_crops: int = contract.MAX_CROPS, source: str = "") -> PreparedImage:
    """An RGB Pillow image -> its crops, size and token count for a budget of `num_crops` sub-crops."""
    started = time.perf_counter()
    contract.check_hd_shape(image.width, image.height, num_crops, source or "(unnamed)")
    padded = hd_transform(image, num_crops)
    arr = np.asarray(padded)  # uint8 [h, w, 3]
    h, w = arr.shape[:2]
    rows, cols = h // S, w // S
    crops = np.empty((1 + rows * cols, 3, S, S), dtype=np.float32)
    # tiles row by row, channels first: [rows, 336, cols, 336, 3] -> [rows * cols, 3, 336, 336]
    tiles = arr.reshape(rows, S, cols, S, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, S, S)
    for c in range(3):  # byte indices are always in range: "wrap" skips numpy's bounds check
        np.take(_LUT[c], tiles[:, c], out=crops[1:, c], mode="wrap")
    crops[0] = global_view(arr)
    return PreparedImage(crops=crops, size=(h, w), tokens=contract.image_token_count(h, w), num_crops=num_crops,
                         source=source, prepare_s=time.perf_counter() - started)


def hd_transform(image: Image.Image, num_crops: int = contract.MAX_CROPS) -> Image.Image:
    """The reference's HD_transform: landscape, bilinear resize, white padding to a multiple of 336, back."""
    width, height = image.size
    transposed = width < height
    if transposed:  # done as the reference does it: Pillow's two resize passes round in a fixed order
        image = image.transpose(Image.Transpose.TRANSPOSE)
    new_w, new_h = contract.hd_scale(width, height, num_crops)
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = -(-new_h // S) * S
    padded = Image.new("RGB", (new_w, target), (255, 255, 255))
    padded.paste(resized, (0, (target - new_h) // 2))
    return padded.transpose(Image.Transpose.TRANSPOSE) if transposed else padded


def global_view(arr: np.ndarray) -> np.ndarray:
    """uint8 [h, w, 3] -> the normalised 336x336 global crop, float32 [3, 336, 336].

    The reference resizes the normalised image; normalisation is affine per channel and the kernel's weights sum
    to 1, so resizing the bytes first and normalising the 336x336 result is the same up to float rounding
    (< 1e-6, checked against the golden file) and reads a quarter of the memory."""
    resized = bicubic_resize(arr, S, S)  # float32 [336, 336, 3], in byte units
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    return ((resized / np.float32(255) - mean) / std).transpose(2, 0, 1)


def bicubic_resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """[h, w, c] -> float32 [out_h, out_w, c] like torch's F.interpolate(mode="bicubic", align_corners=False,
    antialias=False): 4 taps per axis with a = -0.75, borders clamped. Separable: rows, then columns."""
    return _resample(_resample(image, 0, out_h), 1, out_w)


def _resample(a: np.ndarray, axis: int, out: int) -> np.ndarray:
    """torch's bicubic along one axis. Taps whose weight is zero everywhere are skipped and a weight that is the
    same for every output is a scalar: padded sizes are multiples of 336, so the factor is a whole number and
    (for an odd factor) 3 of the 4 taps are zero; same result, 2.5x faster on a 1008x1344 image."""
    index, weights = _cubic_taps(a.shape[axis], out)
    total = None
    for k in range(4):
        w = weights[:, k]
        if not w.any():
            continue
        part = np.take(a, index[:, k], axis=axis)
        if np.all(w == w[0]):
            term = part.astype(np.float32) if w[0] == 1 else part * w[0]
        else:
            shape = [1] * a.ndim
            shape[axis] = out
            term = part * w.reshape(shape)
        total = term if total is None else total + term
    return total.astype(np.float32, copy=False)


def _cubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices [out, 4] and weights [out, 4] of torch's bicubic kernel (align_corners=False)."""
    scale = in_size / out_size
    x = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    x0 = np.floor(x)
    t = x - x0
    a = BICUBIC_A

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1).astype(np.float32)
    index = np.clip(x0[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
    return index, weights
