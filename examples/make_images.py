"""Draw the example images of the README and the notebook (the reference notebook's three tasks), with Pillow.

    python examples/make_images.py            # writes examples/chart.png, cover.png, a.png, b.png

chart.png: a stock's quarterly revenue as a bar chart ("Could you please introduce this stock to me?");
cover.png: a book cover with a title and an author ("Who wrote this book?");
a.png, b.png: two photo-like scenes that differ (the same lake by day, and at dusk with a cabin and a boat:
"What is difference in this two images?").
Deterministic (fixed seeds, Pillow's bundled font) and small: each file stays under 60 KB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

HERE = Path(__file__).resolve().parent
MAX_BYTES = 60_000


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: the same glyphs on every machine


def chart() -> Image.Image:
    """Quarterly revenue of a made-up listed company, with its ticker, price and growth."""
    img = Image.new("RGB", (640, 420), "white")
    d = ImageDraw.Draw(img)
    d.text((24, 16), "NORTHWIND TECHNOLOGIES (NASDAQ: NWTC)", fill="#1a1a1a", font=font(22))
    d.text((24, 46), "Quarterly revenue, USD million   |   Share price $142.37 (+2.4%)", fill="#555555",
           font=font(15))
    quarters = ["Q1 23", "Q2 23", "Q3 23", "Q4 23", "Q1 24", "Q2 24", "Q3 24", "Q4 24"]
    revenue = [412, 438, 455, 501, 523, 560, 598, 647]
    left, right, top, bottom = 80, 616, 90, 370
    top_value = 700
    for v in range(0, top_value + 1, 100):  # grid and axis labels
        y = bottom - (bottom - top) * v / top_value
        d.line([(left, y), (right, y)], fill="#e4e4e4")
        d.text((left - 10, y), str(v), fill="#555555", font=font(13), anchor="rm")
    slot = (right - left) / len(quarters)
    for i, (q, v) in enumerate(zip(quarters, revenue)):
        x0 = left + i * slot + slot * 0.18
        x1 = left + (i + 1) * slot - slot * 0.18
        y = bottom - (bottom - top) * v / top_value
        d.rectangle([x0, y, x1, bottom], fill="#2f6db5" if i < 4 else "#e07b24")
        d.text(((x0 + x1) / 2, y - 4), str(v), fill="#1a1a1a", font=font(13), anchor="md")
        d.text(((x0 + x1) / 2, bottom + 8), q, fill="#333333", font=font(13), anchor="ma")
    d.line([(left, bottom), (right, bottom)], fill="#333333", width=2)
    d.text((right, 400), "Revenue grew 29% in 2024", fill="#333333", font=font(13), anchor="rm")
    return img


def cover() -> Image.Image:
    """A novel's front cover: title, subtitle, author, a simple emblem."""
    w, h = 360, 540
    y = np.linspace(0, 1, h)[:, None, None]
    top, low = np.array([24, 44, 78]), np.array([8, 16, 32])
    img = Image.fromarray(np.broadcast_to(top * (1 - y) + low * y, (h, w, 3)).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    d.rectangle([18, 18, w - 19, h - 19], outline="#d8b45a", width=3)
    d.ellipse([w / 2 - 70, 250, w / 2 + 70, 390], outline="#d8b45a", width=4)
    d.polygon([(w / 2, 270), (w / 2 + 45, 360), (w / 2 - 45, 360)], fill="#d8b45a")
    d.text((w / 2, 90), "THE LIGHTHOUSE", fill="#f3e6c4", font=font(34), anchor="mm")
    d.text((w / 2, 135), "KEEPER", fill="#f3e6c4", font=font(34), anchor="mm")
    d.text((w / 2, 185), "A Novel", fill="#d8b45a", font=font(18), anchor="mm")
    d.text((w / 2, 470), "ELEANOR WHITFIELD", fill="#f3e6c4", font=font(24), anchor="mm")
    return img


def scene(dusk: bool) -> Image.Image:
    """A lake below mountains: by day (sun, green trees), or at dusk (orange sky, moon, a cabin and a boat)."""
    w, h = 480, 320
    rng = np.random.default_rng(7)
    y = np.linspace(0, 1, 190)[:, None, None]
    sky_top, sky_low = (np.array([40, 30, 90]), np.array([250, 140, 60])) if dusk else \
        (np.array([70, 130, 215]), np.array([190, 220, 245]))
    pixels = np.zeros((h, w, 3))
    pixels[:190] = sky_top * (1 - y) + sky_low * y
    water = np.linspace(0, 1, h - 190)[:, None, None]
    pixels[190:] = (np.array([60, 50, 90]) if dusk else np.array([40, 100, 150])) * (1 - water * 0.5)
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    if dusk:
        d.ellipse([380, 40, 420, 80], fill="#f4f1de")
    else:
        d.ellipse([70, 35, 125, 90], fill="#fff3b0")
    ridge = [(0, 190)] + [(x, 110 + 40 * np.sin(x / 55) + 15 * np.sin(x / 17)) for x in range(0, w + 1, 12)] \
        + [(w, 190)]
    d.polygon(ridge, fill="#3c3552" if dusk else "#5a7a5a")
    for x in range(10, w, 38):  # trees on the shore
        base = 196 + rng.integers(0, 6)
        d.polygon([(x, base - 38), (x - 12, base), (x + 12, base)], fill="#1e2a22" if dusk else "#2e6b34")
    if dusk:
        d.rectangle([300, 160, 350, 192], fill="#5b3a29")
        d.polygon([(294, 162), (325, 138), (356, 162)], fill="#7a2e22")
        d.rectangle([318, 172, 330, 184], fill="#ffd36b")  # a lit window
        d.polygon([(150, 250), (230, 250), (215, 265), (165, 265)], fill="#2b2b2b")  # a rowing boat
    return img.filter(ImageFilter.GaussianBlur(0.6))


def main() -> None:
    for name, img in (("chart.png", chart()), ("cover.png", cover()), ("a.png", scene(False)),
                      ("b.png", scene(True))):
        path = HERE / name
        img.save(path, optimize=True)
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise SystemExit(f"{path} is {size} bytes, over the {MAX_BYTES}-byte budget: simplify the drawing")
        print(f"{path.relative_to(HERE.parent)}  {img.width}x{img.height}  {size / 1000:.1f} KB")


if __name__ == "__main__":
    main()
