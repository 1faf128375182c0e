#!/usr/bin/env python3
"""Fetch a published Phi-3-vision ONNX build: the same code as `phi3v-ort fetch`, as a script.

    python scripts/fetch_model.py -m phi-3-vision --variant cpu-int4 [--revision REV] [--dir DIR]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from phi3v_ort.cli.models import fetch  # noqa: E402

if __name__ == "__main__":
    fetch.main(sys.argv[1:], prog_name="fetch_model.py")  # the command alone, under this script's name
