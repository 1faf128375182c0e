"""Build a synthetic Phi-3-vision ONNX package: random weights, the published release's exact shape.

Two steps, and the second is the product's own exporter (`phi3v-ort export`), so every synthetic package
exercises it:

1. `random_checkpoint.write_random_checkpoint`: a random checkpoint in the real published layout (config.json,
   bfloat16 shards + index, nested CLIP names, tokenizer files) in `<out>.checkpoint`;
2. `export.exporter.export_checkpoint`: that checkpoint -> the package in `<out>` (vision and embedding from the
   transformers-native torch modules, the decoder from onnxruntime-genai's model builder).

Needs the `build` extra (torch, transformers, onnx, onnxscript, safetensors).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from phi3v_ort.export.checkpoint import FAMILIES
from phi3v_ort.export.exporter import export_checkpoint, replace_dir
from phi3v_ort.export.variants import DEFAULT_VARIANT, VARIANTS
from phi3v_ort.synthetic.presets import PRESETS
from phi3v_ort.synthetic.random_checkpoint import write_random_checkpoint


@dataclass(frozen=True)
class BuildOptions:
    preset: str = "tiny"
    variant: str = DEFAULT_VARIANT
    family: str = "phi-3"
    seed: int = 0
    check: bool = False  # run the exporter's check against the torch reference after the export

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; choose one of {', '.join(FAMILIES)}")


def _log(msg: str) -> None:
    print(f"[make_synthetic_model] {msg}", file=sys.stderr, flush=True)


def build_package(out_dir: Path | str, opts: BuildOptions = BuildOptions(),
                  checkpoint_dir: Path | str | None = None):
    """Write the random checkpoint into `checkpoint_dir` (default: `<out_dir>.checkpoint`) and export it into
    `out_dir`. Existing folders are replaced only once their new versions are complete. Returns the exporter's
    ExportResult."""
    out_dir = Path(out_dir).resolve()
    ckpt_dir = Path(checkpoint_dir).resolve() if checkpoint_dir else out_dir.with_name(out_dir.name + ".checkpoint")
    p = PRESETS[opts.preset]
    started = time.perf_counter()
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{ckpt_dir.name}.partial-", dir=ckpt_dir.parent))
    try:
        _log(f"preset {p.name}: decoder {p.num_layers}x{p.hidden_size}, CLIP {p.clip_layers}x{p.clip_hidden_size}; "
             f"random {opts.family} checkpoint (seed {opts.seed}) -> {ckpt_dir}")
        write_random_checkpoint(staging, p, opts.family, opts.seed, log=_log)
        replace_dir(staging, ckpt_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _log(f"checkpoint written ({time.perf_counter() - started:.0f}s); exporting it as {opts.variant}")
    result = export_checkpoint(ckpt_dir, out_dir, opts.variant, family=opts.family, check=opts.check,
                               overwrite=True, log=lambda msg: _log(f"export: {msg}"))
    _log(f"done in {time.perf_counter() - started:.0f}s: {out_dir}")
    return result
