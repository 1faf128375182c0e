"""A PEFT LoRA adapter, merged into the checkpoint tensor by tensor (the exporter streams the weights one shard at a
time, so the adapter cannot be applied by loading the whole model into peft).

An adapter folder is what peft's `save_pretrained` writes: `adapter_config.json` + `adapter_model.safetensors` (or
the older `adapter_model.bin`), with keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`
(`lora_A.<adapter name>.weight` is tolerated too). Module paths are normalised to the checkpoint's canonical spelling
with `torch_reference.normalise_key`: the CLIP tower flat (`...img_processor.encoder...` whichever of its two
spellings the adapter was trained on), and `layers.` -> `model.layers.` for an adapter trained on the inner
Phi3VModel. The weight it changes is `<canonical module path>.weight`.

The merge mirrors peft 0.21's `lora.Linear.merge` for plain LoRA on `nn.Linear` (every layer Phi-3-V has LoRA on):

    W' = W + (B @ A) * scale,   scale = lora_alpha / r   (use_rslora: lora_alpha / sqrt(r))

with per-module `r` / `lora_alpha` from `rank_pattern` / `alpha_pattern`, matched as peft's `get_pattern_key` does
against the module's name as peft saw it at training time (the key without `base_model.model.`, before any
normalisation), first matching pattern wins. `fan_in_fan_out` is ignored, as peft ignores it for `nn.Linear` (it
warns and sets it to False): lora_A is always [r, in] and lora_B [out, r].

Anything that is not that plain sum is refused with an `AdapterError` (one line, naming the file, key or module):
DoRA and the other LoRA variants, trainable biases, modules_to_save, embedding / conv LoRA, initialisations that
rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, MiCA).

The merge is this module's own code; peft is only the independent oracle (tests/export/test_export_adapter.py, and
`Phi3VisionReference.apply_adapter`, which the exporter's validation uses).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from phi3v_ort.reference.names import is_bare, normalise_key

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# `<module>.lora_A.weight` or `<module>.lora_A.<adapter name>.weight`
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# Keys of features this merge does not do, and what to call them in the refusal.
_REFUSED_KEYS = (
    (re.compile(r"\.lora_embedding_[AB](\.|$)"), "embedding LoRA (lora_embedding_A/B)"),
    (re.compile(r"\.lora_magnitude_vector(\.|$)"), "DoRA (lora_magnitude_vector)"),
    (re.compile(r"\.lora_B(\.[^.]+)?\.bias$"), "a LoRA bias (lora_bias)"),
    (re.compile(r"(^|\.)modules_to_save(\.|$)"), "modules_to_save"),
    (re.compile(r"(^|\.)trainable_tokens_"), "trainable tokens"),
)
# adapter_config.json fields that make the adapter something other than W + scale * B @ A (peft's LoRA variants
# and the features that change the model's structure or train other tensors), refused when set.
_REFUSED_FIELDS = {
    "use_dora": "DoRA",
    "velora_config": "VeLoRA",
    "alora_invocation_tokens": "aLoRA (its weights apply only after the invocation tokens, so it cannot be merged)",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "use_qalora": "QA-LoRA",
    "lora_bias": "a LoRA bias",
    "modules_to_save": "modules_to_save (whole modules trained beside the LoRA)",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer replication",
}
# init_lora_weights values (or prefixes) whose initialisation rewrites the base weights: such an adapter is relative
# to a residual model, not to the checkpoint.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


class AdapterError(ValueError):
    """The adapter cannot be merged: one line naming the offending file, key or module."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))


def pattern_key(patterns, module: str) -> str | None:
    """The first of `patterns` that matches `module` as peft's `get_pattern_key` matches it (the pattern, a regex,
    must match a dot-separated suffix of the name: `(.*\\.)?(pattern)$` from its start), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer: `source` is its module path as stored (without `base_model.model.`), `name` the canonical
    weight it changes."""

    name: str
    source: str
    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]
    r: int
    alpha: float
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.lora_B.shape[0]), int(self.lora_A.shape[1])


class LoraAdapter:
    """A parsed, checked PEFT LoRA adapter; `merge` applies it to one checkpoint tensor at a time."""

    def __init__(self, path: Path, config: Mapping[str, Any], modules: Mapping[str, LoraModule]):
        self.path = path
        self.config = dict(config)
        self.modules = dict(modules)  # canonical weight name -> LoraModule
        self._merged: set[str] = set()

    # -- loading ---------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> LoraAdapter:
        """Read and check an adapter folder (adapter_config.json + adapter_model.safetensors / .bin)."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise AdapterError(f"{path} is not an adapter folder: no such directory")
        config_path = path / CONFIG_NAME
        if not config_path.is_file():
            raise AdapterError(f"{path} is not a PEFT adapter folder: it has no {CONFIG_NAME}")
        try:
            config = json.loads(config_path.read_text())
        except RecursionError:
            raise AdapterError(f"cannot read {config_path}: it is nested too deeply") from None
        except (OSError, ValueError) as e:
            raise AdapterError(f"cannot read {config_path}: {e}") from None
        if not isinstance(config, dict):
            raise AdapterError(f"{config_path} is not a JSON object")
        _check_config(config, config_path)
        state, weights_path = _load_state(path)
        return cls(path, config, _parse(state, config, weights_path))

    # -- what it changes -------------------------------------------------------------------------------------

    @property
    def targets(self) -> dict[str, tuple[int, int]]:
        """Canonical weight name -> the (out, in) shape the adapter expects it to have."""
        return {name: m.shape for name, m in self.modules.items()}

    def check_against(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Fail (one line) unless every target is a weight of the checkpoint (canonical names -> shapes) with the
        adapter's shape."""
        missing = sorted(set(self.modules) - set(shapes))
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise AdapterError(f"the adapter {self.path} targets {missing[0]}{more}, which the checkpoint does not "
                               f"have")
        for name, module in sorted(self.modules.items()):
            if tuple(int(d) for d in shapes[name]) != module.shape:
                raise AdapterError(f"the adapter {self.path} targets {name} with shape {module.shape} (lora_B "
                                   f"{tuple(module.lora_B.shape)} @ lora_A {tuple(module.lora_A.shape)}), but the "
                                   f"checkpoint's is {tuple(shapes[name])}")

    def delta(self, name: str) -> torch.Tensor | None:
        """(B @ A) * scale in float32 for a target weight (peft's `get_delta_weight`), else None."""
        module = self.modules.get(name)
        if module is None:
            return None
        return (module.lora_B.float() @ module.lora_A.float()) * module.scale

    def merge(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` + delta in float32 for a target (each target once), else `tensor` itself, unchanged."""
        delta = self.delta(name)
        if delta is None:
            return tensor
        if tuple(tensor.shape) != tuple(delta.shape):
            raise AdapterError(f"the adapter {self.path} targets {name} with shape {tuple(delta.shape)}, but the "
                               f"tensor merged into has shape {tuple(tensor.shape)}")
        if name in self._merged:
            raise AdapterError(f"the adapter {self.path}'s update of {name} was merged twice")
        self._merged.add(name)
        return tensor.float() + delta

    @property
    def merged_names(self) -> frozenset[str]:
        return frozenset(self._merged)

    def unmerged(self) -> list[str]:
        """The targets never passed to `merge`, sorted."""
        return sorted(set(self.modules) - self._merged)

    def check_all_merged(self) -> None:
        """Fail (one line) if a target was never merged (the adapter touched something the export never saw)."""
        left = self.unmerged()
        if left:
            more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
            raise AdapterError(f"the adapter {self.path} targets {left[0]}{more}, which the export never merged")


# -- parsing -----------------------------------------------------------------------------------------------------

def _check_config(config: Mapping[str, Any], config_path: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{config_path} has peft_type {peft_type!r}; only 'LORA' adapters can be merged")
    for field, what in _REFUSED_FIELDS.items():
        if config.get(field):
            raise AdapterError(f"{config_path} uses {what} ({field}: {json.dumps(config[field])}); only plain LoRA "
                               f"can be merged")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterError(f"{config_path} has init_lora_weights {init!r}, which rewrites the base weights; convert "
                           f"it to plain LoRA first (peft's save_pretrained(path_initial_model_for_weight_conversion"
                           f"=...))")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterError(f"{config_path} trains biases (bias: {bias!r}); only bias 'none' can be merged")
    _check_numbers(config, config_path)


MAX_RANK = 2**16


def _check_numbers(config: Mapping[str, Any], config_path: Path) -> None:
    """r, lora_alpha, rank_pattern and alpha_pattern as peft writes them, before any weight is read: a rank of 0
    would divide by zero, a NaN alpha would be merged into every weight, a pattern that is not a regex would fail
    mid-merge."""
    _rank(config.get("r", 8), f"{config_path}: r")
    _alpha(config.get("lora_alpha", 8), f"{config_path}: lora_alpha")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterError(f"{config_path}: use_rslora must be true or false")
    for field, check in (("rank_pattern", _rank), ("alpha_pattern", _alpha)):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{config_path}: {field} must be an object of pattern -> value")
        for key, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as exc:
                raise AdapterError(f"{config_path}: {field} key {key[:80]!r} is not a regular expression "
                                   f"({exc})") from None
            check(value, f"{config_path}: {field}[{key[:80]!r}]")


def _rank(value: object, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
        raise AdapterError(f"{where} must be a whole number from 1 to {MAX_RANK:,}, got {json.dumps(value)[:40]}")


def _alpha(value: object, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(f"{where} must be a finite number, got {json.dumps(value)[:40]}")


def _load_state(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    file = path / SAFETENSORS_NAME
    try:
        if file.is_file():
            from safetensors.torch import load_file

            return load_file(str(file)), file
        file = path / BIN_NAME
        if file.is_file():
            state = torch.load(str(file), map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise AdapterError(f"{file} does not hold a state dict")
            return state, file
    except AdapterError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, safetensors' own Exception or an unpickling error: name the file
        raise AdapterError(f"cannot read {file}: {type(e).__name__}: {e}") from None
    raise AdapterError(f"{path} has {CONFIG_NAME} but neither {SAFETENSORS_NAME} nor {BIN_NAME}")


def _parse(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], file: Path) -> dict[str, LoraModule]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}  # module path as stored -> {"lora_A": ..., "lora_B": ...}
    adapter_names: set[str] = set()
    for key, tensor in state.items():
        stripped = key.removeprefix(PEFT_PREFIX)
        for pattern, what in _REFUSED_KEYS:
            if pattern.search(stripped):
                raise AdapterError(f"{file} holds {what} ({key}); only plain LoRA can be merged")
        match = _LORA_KEY.match(stripped)
        if match is None:
            raise AdapterError(f"{file} holds {key}, which is not a LoRA weight (<module>.lora_A.weight or "
                               f"<module>.lora_B.weight)")
        if match["adapter"]:
            adapter_names.add(match["adapter"])
        entry = pairs.setdefault(match["module"], {})
        if match["kind"] in entry:
            raise AdapterError(f"{file} holds two {match['kind']} weights for {match['module']} (more than one "
                               f"adapter in one file?)")
        entry[match["kind"]] = tensor
    if len(adapter_names) > 1:
        raise AdapterError(f"{file} holds several adapters ({', '.join(sorted(adapter_names))}); save one at a time")
    if not pairs:
        raise AdapterError(f"{file} holds no LoRA weights")

    bare = is_bare(pairs)
    r_default = int(config.get("r", 8))
    alpha_default = config.get("lora_alpha", 8)
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    rslora = bool(config.get("use_rslora", False))

    modules: dict[str, LoraModule] = {}
    for source, entry in sorted(pairs.items()):
        for kind, other in (("lora_A", "lora_B"), ("lora_B", "lora_A")):
            if kind in entry and other not in entry:
                raise AdapterError(f"{file} has {source}.{kind} without its {other}")
        a, b = entry["lora_A"], entry["lora_B"]
        if a.dim() != 2 or b.dim() != 2:
            what = "conv LoRA" if max(a.dim(), b.dim()) > 2 else "LoRA weights of unexpected rank"
            raise AdapterError(f"{file} holds {what} for {source} (lora_A {tuple(a.shape)}, lora_B "
                               f"{tuple(b.shape)}); only LoRA on linear layers can be merged")
        if b.shape[1] != a.shape[0]:
            raise AdapterError(f"{file}: {source} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, whose "
                               f"ranks differ")
        r_key = pattern_key(rank_pattern, source)
        alpha_key = pattern_key(alpha_pattern, source)
        r = int(rank_pattern[r_key]) if r_key is not None else r_default
        alpha = alpha_pattern[alpha_key] if alpha_key is not None else alpha_default
        if a.shape[0] != r:
            raise AdapterError(f"{file}: {source}.lora_A has rank {a.shape[0]}, but adapter_config.json gives it "
                               f"r={r}" + (f" (rank_pattern {r_key!r})" if r_key is not None else ""))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        name = normalise_key(source, bare) + ".weight"
        if name in modules:
            raise AdapterError(f"{file} adapts {name} twice (as {modules[name].source} and {source})")
        modules[name] = LoraModule(name, source, a, b, r, alpha, scale)
    return modules
