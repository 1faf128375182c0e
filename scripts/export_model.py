#!/usr/bin/env python3
"""Export a Phi-3-vision / Phi-3.5-vision checkpoint (a fine-tune included) into the release's ONNX layout: the
same code as `phi3v-ort export`, as a script.

    python scripts/export_model.py --checkpoint DIR --out DIR [--variant gpu-int4|cpu-int4|gpu-fp16|cpu-fp32]
                                   [--adapter LORA_DIR] [--no-check]

Needs the build extra: pip install torch -e '.[build]'.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from phi3v_ort.cli.export import export_cmd  # noqa: E402

if __name__ == "__main__":
    export_cmd.main(sys.argv[1:], prog_name="export_model.py")  # the command alone, under this script's name
