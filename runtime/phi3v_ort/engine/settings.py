"""Generation settings: one frozen dataclass, mapped to onnxruntime-genai search options in one function, and the
one function that creates og generators from it (search options + output constraint, guidance.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from phi3v_ort.errors import SettingError
from phi3v_ort.engine.guidance import Guidance, compile_error

INT32_MAX = 2**31 - 1  # og casts max_length, top_k and random_seed to a C++ int: larger values fail inside og
SEED_MAX = INT32_MAX  # og 0.18 accepts random_seed in [-2**31, 2**31 - 1], and -1 there means "seed at random"


@dataclass(frozen=True)
class GenerationSettings:
    """What to generate. Greedy unless do_sample; the sampling knobs only matter when sampling."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int | None = None
    repetition_penalty: float = 1.0
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens (og's min_length = max_length)
    guidance: Guidance | None = None  # structured output: a JSON schema, regex or Lark grammar (guidance.py)

    def __post_init__(self) -> None:
        """Refuse here, in one sentence, what og would refuse later with a traceback (or silently misread)."""
        if not 1 <= self.max_new_tokens <= INT32_MAX:
            raise SettingError(f"max_new_tokens must be between 1 and {INT32_MAX}, got {self.max_new_tokens}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise SettingError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise SettingError(f"temperature must be above 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SettingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.top_k <= INT32_MAX:
            raise SettingError(f"top_k must be between 1 and {INT32_MAX}, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= SEED_MAX:
            raise SettingError(f"seed must be between 0 and {SEED_MAX}, got {self.seed}")
        if self.repetition_penalty <= 0:
            raise SettingError(f"repetition_penalty must be above 0, got {self.repetition_penalty}")
        if self.guidance is not None and not isinstance(self.guidance, Guidance):
            raise SettingError(f"guidance must be a Guidance, got {type(self.guidance).__name__}")
        if self.guidance is not None and self.ignore_eos:  # og would mask the only token a complete answer allows
            raise SettingError("ignore_eos cannot be combined with an output constraint: a constrained answer ends "
                               "when it is complete")


def make_settings(max_new_tokens: int = 512, temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, seed: int | None = None,
                  guidance: Guidance | None = None) -> GenerationSettings:
    """Greedy unless a sampling option is given: the one place the CLI and the Python API build GenerationSettings
    from what a user gave. `guidance`: the output constraint (guidance.from_cli / from_values), checked before any
    model is loaded as far as that can be. Wrong types are one sentence too (the CLI's options are typed already).

    >>> make_settings(max_new_tokens=64, temperature=0.7).do_sample
    True
    """
    for name, value in (("max_new_tokens", max_new_tokens), ("top_k", top_k), ("seed", seed)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise SettingError(f"{name} must be an integer, got {value!r}")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SettingError(f"{name} must be a number, got {value!r}")
    sampling = {k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)) if v is not None}
    sampling.update({k: float(sampling[k]) for k in ("temperature", "top_p") if k in sampling})  # 0 reads as 0.0
    return GenerationSettings(max_new_tokens=max_new_tokens, do_sample=bool(sampling), seed=seed, guidance=guidance,
                              **sampling)


def search_options(settings: GenerationSettings, max_length: int, share_buffer: bool) -> dict:
    """The og search options for one request (max_length and the buffer mode come from the KV-cache plan)."""
    options: dict = {
        "max_length": int(max_length),
        "past_present_share_buffer": bool(share_buffer),
        "repetition_penalty": float(settings.repetition_penalty),
        "do_sample": bool(settings.do_sample),
    }
    if settings.ignore_eos:
        options["min_length"] = int(max_length)
    if settings.do_sample:
        options.update(temperature=float(settings.temperature), top_p=float(settings.top_p),
                       top_k=int(settings.top_k))
        if settings.seed is not None:
            options["random_seed"] = int(settings.seed)
    else:
        options["top_k"] = 1  # greedy, whatever the package's config says
    return options


def create_generator(og_model, settings: GenerationSettings, max_length: int, share_buffer: bool):
    """An og.Generator for one request or conversation: the search options and the output constraint, applied
    here and nowhere else. Creating it compiles the constraint (before any prefill): a constraint og cannot
    compile is a GuidanceError."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(og_model)
    params.set_search_options(**search_options(settings, max_length, share_buffer))
    if settings.guidance is not None:
        params.set_guidance(settings.guidance.kind, settings.guidance.data)
    try:
        return og.Generator(og_model, params)
    except RuntimeError as exc:
        if settings.guidance is not None and ("grammar" in str(exc) or "guidance" in str(exc).lower()):
            raise compile_error(settings.guidance, exc) from None
        raise
