"""phi3v-ort's opt-in extension of a chat-completions request, `"phi3v": {...}`: what a client needs to give the
same answer as in-process generation (the CLI's `run` and `chat` through a server), which OpenAI's format lacks.

Request fields, all optional:
- `token_ids` (bool): the response carries the answer's token ids.
- `stats` (bool): the response carries the prompt's token count, the image tokens per image and the engine's
  stats (the `stats` of `run --json`, with `load_s`: the server's model load time, and `warm`: true).
- `cap_max_tokens` (bool): `max_tokens` is the most the answer may have, as `run --max-new-tokens` is: a prompt
  that leaves less room gets what fits instead of a 400 (what the server does when max_tokens is not given).
- `guidance` (object): an output constraint as the runtime holds it, `{"kind": "json_schema" | "regex" |
  "lark_grammar", "data": TEXT, "label": NAME}` (regexes and Lark grammars have no OpenAI field); not together
  with `response_format`.

Response: a non-streamed completion gets a top-level `"phi3v"` object, a stream gets it in the chunk that carries
the finish_reason: `{"token_ids": [...], "prompt_tokens": N, "num_image_tokens": [...], "stats": {...}}` (each
part as asked).
"""

from __future__ import annotations

from dataclasses import dataclass

from phi3v_ort.engine.guidance import Guidance

FIELDS = ("token_ids", "stats", "cap_max_tokens", "guidance")


class ExtensionError(ValueError):
    """A malformed `phi3v` object: `param` names the field (the server answers a 400 naming it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Extension:
    token_ids: bool = False
    stats: bool = False
    cap_max_tokens: bool = False
    guidance: Guidance | None = None


def parse_extension(value: object) -> Extension | None:
    """The request's `phi3v` object (None when absent); raises ExtensionError."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ExtensionError("phi3v", "phi3v must be an object")
    unknown = sorted(k for k in value if k not in FIELDS)
    if unknown:
        raise ExtensionError(f"phi3v.{unknown[0]}", f"unknown field phi3v.{unknown[0]}")
    flags = {}
    for name in ("token_ids", "stats", "cap_max_tokens"):
        flag = value.get(name)
        if flag is not None and not isinstance(flag, bool):
            raise ExtensionError(f"phi3v.{name}", f"phi3v.{name} must be true or false")
        flags[name] = bool(flag)
    return Extension(**flags, guidance=_guidance(value.get("guidance")))


def _guidance(spec: object) -> Guidance | None:
    if spec is None:
        return None
    param = "phi3v.guidance"
    if not isinstance(spec, dict) or sorted(spec) not in (["data", "kind"], ["data", "kind", "label"]):
        raise ExtensionError(param, f"{param} must be an object with kind, data and optionally label")
    if not all(isinstance(spec[k], str) for k in spec):
        raise ExtensionError(param, f"{param}'s kind, data and label must be strings")
    from phi3v_ort.errors import Phi3vError

    try:
        return Guidance(**spec)
    except Phi3vError as exc:
        raise ExtensionError(param, str(exc)) from None


def guidance_body(guidance: Guidance) -> dict:
    """A constraint as `phi3v.guidance` carries it."""
    return {"kind": guidance.kind, "data": guidance.data, "label": guidance.label}


def response_fields(extension: Extension | None, finished, load_s: float | None) -> dict:
    """What a response adds for the extension: `{"phi3v": {...}}`, or nothing (not asked, or no answer came:
    a stop string cancelled it)."""
    if extension is None or finished is None or not (extension.token_ids or extension.stats):
        return {}
    out: dict = {}
    if extension.token_ids:
        out["token_ids"] = list(finished.token_ids)
    if extension.stats:
        stats = finished.stats.to_dict()
        out["prompt_tokens"] = stats["prompt_tokens"]
        out["num_image_tokens"] = stats["image_tokens"]
        out["stats"] = {**stats, "load_s": load_s, "warm": True}
    return {"phi3v": out}
