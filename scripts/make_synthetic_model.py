#!/usr/bin/env python3
"""Build a synthetic Phi-3-vision ONNX package (random weights, the published release's exact shape).

    python scripts/make_synthetic_model.py --preset tiny --out models/tiny-int4-cpu
    python scripts/make_synthetic_model.py --preset full --provider cuda --out models/full-int4-cuda

The logic lives in phi3v_ort.synthetic (importable by tests and benchmarks); this is only the entry point.
Needs the build extra: pip install -e '.[build]'.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from phi3v_ort.synthetic.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
