"""Images in: local paths, http(s) URLs and stdin (load_image, the CLI's), and what a Python caller holds (PIL
images, bytes, numpy arrays: to_image_input, the API's), decoded once and checked with Pillow.

Every image is decoded here, once: EXIF orientation applied, any mode converted to RGB (alpha composited on white,
16-bit scaled), decompression bombs refused. The runtime's own pipeline (pixels.py) works on that RGB image, so
every format Pillow reads works, PNGs wider than og's 16384-px limit included.

Only `--processor og` needs bytes again: og's decoder reads only JPEG and PNG and other formats kill the whole
process inside its processor (see the release contract). `og_bytes()` hands it the original bytes when they are
an RGB PNG or JPEG with no EXIF rotation (keeping og's own JPEG rounding), else a lossless PNG of the RGB image.
"""

from __future__ import annotations

import io
import os
import stat
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from phi3v_ort.errors import ImageError

MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold (about 9459x9459)
MAX_BYTES = 50 * 1024 * 1024
URL_TIMEOUT_S = 20.0
PASS_THROUGH_FORMATS = {"PNG", "JPEG"}


@dataclass(frozen=True)
class ImageInput:
    """One decoded, checked image: its RGB pixels, the bytes it came as, and where it came from."""

    source: str
    data: bytes  # the bytes as read (their hash identifies the image)
    image: Image.Image = field(repr=False)  # RGB, EXIF orientation applied
    pass_through: bool  # `data` is an RGB PNG/JPEG og reads exactly as Pillow does
    load_s: float  # read + decode + conversion time

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    def og_bytes(self) -> bytes:
        """PNG or JPEG bytes for og's own processor (`--processor og`)."""
        if self.pass_through:
            return self.data
        out = io.BytesIO()
        self.image.save(out, format="PNG", compress_level=1)  # lossless; speed over size, it never leaves memory
        return out.getvalue()


def load_image(source: str, stdin: BinaryIO | None = None, *, max_bytes: int = MAX_BYTES,
               max_pixels: int = MAX_PIXELS, timeout: float = URL_TIMEOUT_S) -> ImageInput:
    """Read `source` (a path, an http(s) URL, or '-' for stdin) and return an image og can take."""
    started = time.perf_counter()
    if source == "-":
        stream = stdin
        if stream is None:
            import sys

            stream = sys.stdin.buffer
        raw = stream.read(max_bytes + 1)
        label = "stdin"
    elif source.startswith(("http://", "https://")):
        raw = _download(source, max_bytes, timeout)
        label = source
    else:
        raw = _read_file(Path(source).expanduser(), max_bytes)
        label = source
    return from_bytes(raw, label, started, max_bytes=max_bytes, max_pixels=max_pixels)


def from_bytes(raw: bytes, label: str, started: float | None = None, *, max_bytes: int = MAX_BYTES,
               max_pixels: int = MAX_PIXELS) -> ImageInput:
    """Encoded image bytes (PNG, JPEG, any format Pillow reads) -> a checked ImageInput named `label`."""
    started = time.perf_counter() if started is None else started
    if len(raw) > max_bytes:
        raise ImageError(f"image {label} is larger than the {max_bytes // (1024 * 1024)} MB limit")
    if not raw:
        raise ImageError(f"image {label} is empty")
    image, pass_through = decode(raw, label, max_pixels)
    return ImageInput(source=label, data=raw, image=image, pass_through=pass_through,
                      load_s=time.perf_counter() - started)


ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, ImageInput]


def to_image_input(image: ImageLike, label: str | None = None, *, allow_remote: bool = False,
                   max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
                   timeout: float = URL_TIMEOUT_S) -> ImageInput:
    """Any image a Python caller holds -> one decoded, checked ImageInput (the Python API's images).

    Takes a path (str or pathlib.Path), a PIL image, encoded bytes, a numpy HxWx3 uint8 array (RGB), or an
    http(s) URL when `allow_remote` (fetched by remote.py's guarded fetcher, as the server fetches: never from
    a private address, one deadline). A path or URL names itself in messages, anything else is named `label`
    (default "the image"). A bad image is an ImageError, one sentence.

    >>> to_image_input(np.zeros((8, 8, 3), dtype=np.uint8)).width
    8
    """
    started = time.perf_counter()
    if isinstance(image, ImageInput):
        return image
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        if not allow_remote:
            raise ImageError(f"image {image} is a URL: pass allow_remote=True to fetch it (never from a private "
                             "address)")
        return from_bytes(_fetch_guarded(image, max_bytes, timeout), image, started, max_bytes=max_bytes,
                          max_pixels=max_pixels)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        return from_bytes(_read_file(path, max_bytes), str(image), started, max_bytes=max_bytes,
                          max_pixels=max_pixels)
    label = label or "the image"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return from_bytes(bytes(image), label, started, max_bytes=max_bytes, max_pixels=max_pixels)
    if isinstance(image, Image.Image):
        return _from_pixels(image, label, started, max_pixels)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(f"{label} must be an HxWx3 uint8 array (RGB), got shape {tuple(image.shape)} "
                             f"{image.dtype}")
        return _from_pixels(Image.fromarray(np.ascontiguousarray(image), "RGB"), label, started, max_pixels)
    raise ImageError(f"{label} is of type {type(image).__name__}: give a path, a PIL image, bytes or an HxWx3 "
                     "uint8 array")


def _from_pixels(img: Image.Image, label: str, started: float, max_pixels: int) -> ImageInput:
    """A PIL image (EXIF orientation applied, as for a file) -> ImageInput; its bytes are a lossless PNG."""
    if img.width * img.height > max_pixels:
        raise ImageError(f"image {label} is {img.width}x{img.height} pixels, over the {max_pixels:,}-pixel limit "
                         "(a possible decompression bomb)")
    if img.width < 1 or img.height < 1:
        raise ImageError(f"image {label} is empty")
    try:
        img.load()
        if img.getexif().get(0x0112, 1) not in (0, 1):
            img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"image {label} could not be decoded ({exc})") from None
    out = io.BytesIO()
    rgb.save(out, format="PNG", compress_level=1)  # what crosses to og's processor and identifies the image
    return ImageInput(source=label, data=out.getvalue(), image=rgb, pass_through=True,
                      load_s=time.perf_counter() - started)


def _read_file(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes. Anything else is refused before it is opened: opening a FIFO blocks until a writer
    comes (a batch hung forever, Ctrl-C included), and a device can be endless or act on being opened. It is
    opened non-blocking and checked again, so a path swapped for a FIFO in between cannot hang the read either."""
    try:
        kind = _file_kind(os.stat(path).st_mode)
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot read image {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if kind != "a regular file":
        raise ImageError(f"image path {path} is {kind}, not an image file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ImageError(f"image path {path} is not a regular file, not an image file")
            return f.read(max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc.strerror or exc}") from None


def _file_kind(mode: int) -> str:
    """What a stat mode is, in words (for the one sentence that refuses it)."""
    for test, words in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                        (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "not a regular file"


def _download(url: str, max_bytes: int, timeout: float) -> bytes:
    """The CLI's own URLs: the same fetcher as the server (one deadline for the whole image, redirects followed
    by hand), private addresses allowed (it is the user's machine), and the precise cause in the message."""
    from phi3v_ort.inputs.remote import RemoteImageError, fetch_image_bytes

    try:
        return fetch_image_bytes(url, max_bytes=max_bytes, deadline_s=timeout, allow_private=True)
    except RemoteImageError as exc:
        if exc.too_large:
            raise ImageError(f"image {url} is larger than the {max_bytes // (1024 * 1024)} MB limit") from None
        if exc.cause.startswith("content type "):
            raise ImageError(f"{url} is not an image (the server says {exc.cause.removeprefix('content type ')})") \
                from None
        raise ImageError(f"could not download {url}: {exc.cause}") from None


def _fetch_guarded(url: str, max_bytes: int, timeout: float) -> bytes:
    """A caller's URL through the server's guarded fetcher: private addresses refused, the neutral sentence."""
    from phi3v_ort.inputs.remote import fetch_image_bytes

    return fetch_image_bytes(url, max_bytes=max_bytes, deadline_s=timeout)


def decode(raw: bytes, label: str, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, bool]:
    """Bytes -> (an RGB image with EXIF orientation applied, whether the bytes can go to og unchanged)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"image {label} is {width}x{height} pixels, over the {max_pixels:,}-pixel limit "
                                 "(a possible decompression bomb)")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image {label} is too large to decode safely (a possible decompression bomb)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label} is not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"image {label} could not be decoded ({exc})") from None

    orientation = img.getexif().get(0x0112, 1)
    pass_through = img.format in PASS_THROUGH_FORMATS and img.mode == "RGB" and orientation in (0, 1)
    if orientation not in (0, 1):
        img = ImageOps.exif_transpose(img)
    return to_rgb(img), pass_through


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha composited on white, 16/32-bit scaled to 8 bits, CMYK and palettes
    converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
        img = Image.fromarray(((arr - lo) * (255.0 / max(hi - lo, 1e-12))).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img
