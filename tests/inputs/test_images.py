"""Image loading: every Pillow mode to RGB, EXIF orientation, formats og cannot read (only --processor og gets
bytes: PNG/JPEG, the originals passed through when og reads them the same)."""

import io

import numpy as np
import pytest
from PIL import Image

from phi3v_ort.errors import Phi3vError
from phi3v_ort.inputs.images import load_image


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def _decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format in ("PNG", "JPEG")  # og's decoder reads only these
    img.load()
    return img


def _load(data: bytes):
    return load_image("-", stdin=io.BytesIO(data))


@pytest.mark.parametrize("mode, fmt", [("RGBA", "PNG"), ("P", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("I;16", "PNG"),
                                       ("CMYK", "JPEG"), ("RGB", "BMP"), ("RGB", "GIF"), ("RGB", "WEBP"),
                                       ("RGB", "TIFF"), ("1", "PNG"), ("F", "TIFF")])
def test_every_mode_and_format_becomes_rgb_png_or_jpeg(mode, fmt):
    base = Image.linear_gradient("L").resize((64, 48))
    img = base.convert(mode) if mode not in ("I;16", "F") else base
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base, dtype=np.uint16) * 257)
        assert img.mode.startswith("I;16")
    if mode == "F":
        img = Image.fromarray(np.asarray(base, dtype=np.float32) / 255.0)
    loaded = _load(_bytes(img, fmt))
    out = _decoded(loaded.og_bytes())
    assert out.mode == "RGB" and (loaded.width, loaded.height) == (64, 48)
    assert loaded.image.mode == "RGB" and np.array_equal(np.asarray(loaded.image), np.asarray(out))
    if mode == "I;16":  # 16-bit scaled back to the 8-bit values, not clipped to white
        assert np.abs(np.asarray(out)[..., 0].astype(int) - np.asarray(base).astype(int)).max() <= 1


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    loaded = _load(_bytes(img, "PNG"))
    assert (np.asarray(_decoded(loaded.og_bytes())) == 255).all() and (np.asarray(loaded.image) == 255).all()


def test_rgb_png_and_jpeg_pass_through_untouched():
    img = Image.linear_gradient("L").convert("RGB").resize((40, 30))
    for fmt in ("PNG", "JPEG"):
        data = _bytes(img, fmt)
        assert _load(data).og_bytes() == data  # og decodes the original bytes itself (its own JPEG rounding)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 20), (10, 200, 10))
    img.paste((200, 10, 10), (0, 0, 10, 20))  # a red stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    loaded = _load(_bytes(img, "JPEG", exif=exif.tobytes(), quality=95))
    out = np.asarray(_decoded(loaded.og_bytes()))
    assert (loaded.width, loaded.height) == (20, 60)
    assert np.array_equal(np.asarray(loaded.image), out)
    assert out[2, 10, 0] > 150 and out[-3, 10, 0] < 100  # the red stripe is now at the top


def test_bad_inputs_are_one_sentence(tmp_path):
    with pytest.raises(Phi3vError, match="empty"):
        _load(b"")
    with pytest.raises(Phi3vError, match="not an image"):
        _load(b"GIF89a but not really")
    with pytest.raises(Phi3vError, match="larger than"):
        load_image("-", stdin=io.BytesIO(b"x" * 2000), max_bytes=1000)
    with pytest.raises(Phi3vError, match="decompression bomb"):
        load_image("-", stdin=io.BytesIO(_bytes(Image.new("L", (400, 400)), "PNG")), max_pixels=100_000)
