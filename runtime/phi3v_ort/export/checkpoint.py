"""A Phi-3-vision / Phi-3.5-vision checkpoint folder, read without loading it: config, shards, tensor names and shapes.

The layout is the one microsoft/Phi-3-vision-128k-instruct and microsoft/Phi-3.5-vision-instruct publish:
config.json (model_type "phi3_v", `rope_scaling` {"type": "su" | "longrope", short/long factors}, `img_processor`
naming CLIP ViT-L/14-336, no `vision_config`), weights in `model-0000k-of-0000n.safetensors` shards with
`model.safetensors.index.json` (or one `model.safetensors`), the CLIP tower under
`model.vision_embed_tokens.img_processor.vision_model.*`, and the tokenizer files. What a name means, how the
decoder and CLIP configs are read, and which spellings are accepted is torch_reference's (one place for it); this
module adds the header-only scan and the one-line verdict the exporter gives before it spends any time:

    Checkpoint.open(path)  ->  every expected tensor present once, with config.json's shape, or CheckpointError

`expected_tensors()` builds the two torch modules on the meta device (no memory) and lists their tensors under
the canonical names, so the exporter, the validation and the synthetic checkpoint writer all agree on one list.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phi3v_ort.export.config_check import check_config, read_config
from phi3v_ort.package.contract import TOKENIZER_FILES
from phi3v_ort.reference.model import decoder_config, parameter_targets, vision_config
from phi3v_ort.reference.names import (EMBED_TOKENS, IGNORED_KEYS, VISION_PREFIX, WTE_ALIAS, CheckpointError, is_bare,
                                       normalise_key, shard_files)

FAMILIES = ("phi-3", "phi-3.5")
REQUIRED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class StoredTensor:
    name: str  # as stored in the file
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' spelling: BF16, F16, F32


@dataclass
class Checkpoint:
    path: Path
    config: dict
    family: str
    tensors: dict[str, StoredTensor]  # canonical name -> where it is
    expected: dict[str, tuple[int, ...]] = field(repr=False)

    @classmethod
    def open(cls, path: str | Path, family: str = "auto") -> Checkpoint:
        """Read config.json and every shard's header; raise CheckpointError (one line) on anything missing,
        misshapen or unknown."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a folder")
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path} is not a checkpoint folder: it has no config.json")
        config = read_config(config_path)
        if config.get("model_type") != "phi3_v":
            raise CheckpointError(f"{config_path} has model_type {config.get('model_type')!r}, not 'phi3_v' "
                                  f"(Phi-3-vision or Phi-3.5-vision)")
        check_config(config, config_path)
        for name in REQUIRED_TOKENIZER_FILES:
            if not (path / name).is_file():
                raise CheckpointError(f"{path} has no {name}: the package needs the checkpoint's tokenizer files")
        for name in TOKENIZER_FILES:  # what the package will copy: checked now, not after the export
            tokenizer_source(path, name)
        expected = expected_tensors(config)
        ckpt = cls(path=path, config=config, family=detect_family(config, family), tensors=_scan(path),
                   expected=expected)
        ckpt.validate()
        return ckpt

    # -- configs -------------------------------------------------------------------------------------------------

    def decoder_config(self, dtype: torch.dtype = torch.float32):
        return decoder_config(self.config, dtype, "eager")

    def clip_config(self):
        return vision_config(self.config, None, "eager")

    @property
    def dtype(self) -> torch.dtype:
        """The decoder weights' dtype as stored (the real checkpoints: bfloat16)."""
        stored = self.tensors.get("lm_head.weight")
        return _TORCH_DTYPES.get(stored.dtype, torch.float32) if stored else torch.float32

    # -- tensors -------------------------------------------------------------------------------------------------

    def validate(self) -> None:
        present = set(self.tensors)
        missing = [n for n in self.expected if n not in present]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.path} lacks the tensor {missing[0]}{more}")
        for name, want in self.expected.items():
            got = self.tensors[name]
            if got.shape != want:
                raise CheckpointError(f"{got.file.name}: tensor {got.name} has shape {list(got.shape)}, but "
                                      f"config.json makes it {list(want)}")
        unexpected = [t.name for n, t in self.tensors.items() if n not in self.expected]
        if unexpected:
            more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            raise CheckpointError(f"{self.path} has a tensor Phi-3-vision does not: {unexpected[0]}{more}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.expected)

    def iter_tensors(self, wanted=None) -> Iterator[tuple[str, torch.Tensor]]:
        """(canonical name, tensor) for the tensors `wanted(name)` accepts, a shard at a time in file order
        (safetensors maps the file: only the tensors asked for are read)."""
        from safetensors import safe_open

        by_file: dict[Path, list[tuple[str, StoredTensor]]] = {}
        for name, stored in self.tensors.items():
            if wanted is None or wanted(name):
                by_file.setdefault(stored.file, []).append((name, stored))
        for file, items in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name, stored in items:
                    yield name, f.get_tensor(stored.name)


def tokenizer_source(folder: Path, name: str) -> Path | None:
    """The regular file a checkpoint's tokenizer file is, or None when absent. A symlink may point inside the
    checkpoint folder, or, for a hub-cache snapshot (`.../snapshots/COMMIT`), into that repository's cache folder
    (where the hub keeps the blobs); one that leads anywhere else is refused: the export would publish whatever it
    points at (a private 0600 file became a 0644 package file)."""
    path = folder / name
    if not path.is_symlink() and not path.exists():
        return None
    real = Path(os.path.realpath(path))
    roots = [Path(os.path.realpath(folder))]
    if roots[0].parent.name == "snapshots":
        roots.append(roots[0].parent.parent)
    if not any(real == root or root in real.parents for root in roots):
        raise CheckpointError(f"{path} is a symlink to {real}, outside the checkpoint folder: copy the file in "
                              f"(the package would publish it)")
    if not real.is_file():
        raise CheckpointError(f"{path} is not a regular file")
    return real


def is_vision(name: str) -> bool:
    return name.startswith(VISION_PREFIX)


def is_decoder(name: str) -> bool:
    return not is_vision(name)


def detect_family(config: dict, family: str = "auto") -> str:
    """'phi-3.5' when config.json's `_name_or_path` says 3.5 (microsoft/Phi-3.5-vision-instruct's does), else
    'phi-3'; an explicit family wins."""
    if family != "auto":
        if family not in FAMILIES:
            raise CheckpointError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
        return family
    name = str(config.get("_name_or_path", "")).lower()
    return "phi-3.5" if "3.5" in name or "3_5" in name else "phi-3"


def expected_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor Phi-3-vision with this config.json has (modules built on meta)."""
    from transformers import Phi3ForCausalLM

    from phi3v_ort.reference.modules import Phi3VImageEmbedding

    dec_cfg = decoder_config(config, torch.float32, "eager")
    clip_cfg = vision_config(config, None, "eager")
    with torch.device("meta"):
        decoder = Phi3ForCausalLM(dec_cfg)
        vision = Phi3VImageEmbedding(clip_cfg, dec_cfg.hidden_size)
    return {k: tuple(v.shape) for k, v in parameter_targets(decoder, vision).items()}


def _scan(path: Path) -> dict[str, StoredTensor]:
    """Canonical name -> stored tensor, from the shards' headers. The remote code's `vision_embed_tokens.wte` (the
    token embedding again) stands in for `model.embed_tokens.weight` only when that is absent."""
    from safetensors import safe_open

    files = shard_files(path)
    found: dict[str, StoredTensor] = {}
    wte: StoredTensor | None = None
    bare: bool | None = None
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())
                if bare is None:
                    bare = is_bare(keys)
                for key in keys:
                    sl = f.get_slice(key)
                    stored = StoredTensor(key, file, tuple(int(d) for d in sl.get_shape()), sl.get_dtype())
                    name = normalise_key(key, bare)
                    if name == WTE_ALIAS:
                        wte = stored
                        continue
                    if IGNORED_KEYS.search(name):
                        continue
                    if name in found:
                        raise CheckpointError(f"{file.name}: tensor {key} is stored twice (also in "
                                              f"{found[name].file.name} as {found[name].name})")
                    found[name] = stored
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for a damaged header
            raise CheckpointError(f"{file.name} is not a readable safetensors file ({exc})") from None
    if EMBED_TOKENS not in found and wte is not None:
        found[EMBED_TOKENS] = wte
    return found


_TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
