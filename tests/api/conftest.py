"""The Python API's tests share one loaded fixture model (loading it takes about half a second, but a module of
tests asks it dozens of questions)."""

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def model(tiny_dir):
    import phi3v_ort

    with phi3v_ort.load(tiny_dir, device="cpu") as m:
        yield m


@pytest.fixture(scope="session")
def chart() -> Path:
    return EXAMPLES / "chart.png"
