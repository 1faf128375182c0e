"""Structured output: a JSON schema, a regex or a Lark grammar that constrains decoding (og's `set_guidance`).

onnxruntime-genai 0.18 takes `GeneratorParams.set_guidance(kind, data)` with kind `json_schema`, `regex` or
`lark_grammar` and compiles it (llguidance) when the og.Generator is created: that needs a loaded og.Model, and it
is before any prefill. A constraint is a `Guidance` (frozen, picklable: it lives in GenerationSettings and crosses
to the worker processes); `settings.create_generator` is the one place it reaches og, and turns a grammar og
cannot compile into a `GuidanceError` (one sentence: a CLI `Error:` line, a server 400 naming response_format).

What the runtime adds to a JSON schema (and nothing else):
- `"x-guidance": {"whitespace_flexible": false}` at the schema's top level, unless the schema already has an
  `x-guidance` object that sets `whitespace_flexible` (then the user's choice stands). llguidance's default lets
  the model put any whitespace between JSON tokens, and a model that prefers whitespace (random weights always,
  real weights sometimes) then writes an endless valid prefix of spaces and newlines. Without it the JSON is
  compact: `{"a":1,"b":[2,3]}`.
- Nothing else: no `maxLength`, no `additionalProperties`, no `required` (they would change what the schema
  accepts). A string without `maxLength` can still run until the token budget; then the answer is reported as
  cut (below), never returned as if it were complete.
`--json-object` / `response_format: {"type": "json_object"}` is the schema `{"type": "object"}` with the same
addition. In a `--regex`, `\\d` / `\\D` mean an ASCII digit / non-digit (`[0-9]`, as JSON Schema's patterns read
them; see `ascii_digits`); everything else in a regex, and Lark grammars, are passed to og exactly as given.

Limits (constraint_limits.py): before og compiles a constraint, its size, nesting, counts (`maxItems`...), regex
repetitions, Lark `~ n` and `%json{...}` schemas are checked against fixed limits, and a schema without a finite
answer (a `$ref` loop, a recursion required all the way down) is refused: some of those abort the process or
exhaust its memory inside og, or fail only after the prefill. og's own internals (a Rust panic, a parser-state
dump) go to the log, never into a message.

The guarantee (`outcome`): a guided answer that ended on the end token is complete by construction (og's mask
allows the end token only where the constraint accepts), and a JSON one is parsed (and a regex one matched) here
to be sure. An answer that stopped on the token budget is incomplete: the CLI says so in one line and exits
non-zero, a batch item becomes an error line, the server answers finish_reason "length" (as OpenAI does).

Conversations: og fixes the constraint when a generator is created, so a turn whose constraint differs from the
kept generator's (changed, turned on or off) re-prefills the transcript with a Notice. A turn with the same
constraint continues the kept generator when the last answer ended complete (og restarts the constraint for the
next answer), and re-prefills when the last answer was cut mid-structure (og would continue that structure).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from phi3v_ort.engine import constraint_limits
from phi3v_ort.errors import ConstraintError, Phi3vError

KINDS = ("json_schema", "regex", "lark_grammar")
WHAT = {"json_schema": "JSON", "regex": "regex match", "lark_grammar": "grammar"}
RUNTIME_X_GUIDANCE = {"whitespace_flexible": False}
JSON_OBJECT_SCHEMA = {"type": "object"}
INTERNALS = ("<state>", "<backtrace>", "Tokens: ", "Parser: {")  # where og's message turns into llguidance's dump
log = logging.getLogger(__name__)


class GuidanceError(ConstraintError):
    """A constraint og cannot compile (or a malformed one): the user's input, said in one sentence."""


class GuidanceFailed(Phi3vError):
    """og's constrained decoder failed in the middle of an answer (not the user's fault: a 500 on the server)."""


@dataclass(frozen=True)
class Guidance:
    """One constraint: `kind` is og's guidance type, `data` exactly what og gets (a schema after `normalize_schema`,
    as compact JSON text). `label` names it in messages (the CLI option or the request field)."""

    kind: str
    data: str
    label: str = "the output constraint"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GuidanceError(f"unknown guidance type {self.kind!r}: choose from {', '.join(KINDS)}")
        if not isinstance(self.data, str) or not self.data.strip():
            raise GuidanceError(f"{self.label} is empty")
        try:
            self.data.encode("utf-8")
        except UnicodeEncodeError as exc:  # og's binding would refuse it with its own signature in the message
            raise GuidanceError(f"{self.label} is not valid Unicode text: a lone surrogate "
                                f"({self.data[exc.start]!r}) at character {exc.start}") from None
        found = constraint_limits.problem(self.kind, self.data)
        if found:  # before og compiles it: some of what is over these limits aborts or exhausts the process
            raise GuidanceError(f"{self.label} {found}")

    @property
    def is_json(self) -> bool:
        return self.kind == "json_schema"


def normalize_schema(schema: object, label: str = "the JSON schema") -> dict:
    """The schema og gets: the user's, plus `x-guidance.whitespace_flexible = false` where not set (see above)."""
    if not isinstance(schema, dict):
        raise GuidanceError(f"{label} must be a JSON object, got {_json_type(schema)}")
    out = dict(schema)
    x = out.get("x-guidance")
    if x is None:
        out["x-guidance"] = dict(RUNTIME_X_GUIDANCE)
    elif not isinstance(x, dict):
        raise GuidanceError(f"{label}: x-guidance must be an object")
    elif "whitespace_flexible" not in x:
        out["x-guidance"] = {**x, **RUNTIME_X_GUIDANCE}
    return out


def json_schema(schema: object, label: str = "the JSON schema") -> Guidance:
    try:
        text = json.dumps(normalize_schema(schema, label), ensure_ascii=False, separators=(",", ":"))
    except RecursionError:
        raise GuidanceError(f"{label} nests deeper than {constraint_limits.MAX_DEPTH} levels") from None
    return Guidance("json_schema", text, label)


def json_object(label: str = "--json-object") -> Guidance:
    return json_schema(dict(JSON_OBJECT_SCHEMA), label)


def regex(pattern: str, label: str = "the regex") -> Guidance:
    return Guidance("regex", ascii_digits(pattern), label)


def ascii_digits(pattern: str) -> str:
    """`\\d` -> `[0-9]` and `\\D` -> `[^0-9]` (in a class: `\\d` -> `0-9`); every other character as given.

    og's regex `\\d` is Unicode's (fullwidth and other scripts' digits too), which is rarely what a pattern for a
    date or a number means, and og 0.18 fails mid-answer on the tiny fixture when a model starts such a multi-byte
    digit ("Error committing tokens ... forced bytes"). JSON Schema's patterns (ECMA-262) read `\\d` as [0-9] too."""
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if nxt == "d":
                out.append("0-9" if in_class else "[0-9]")
            elif nxt == "D" and not in_class:
                out.append("[^0-9]")
            else:
                out.append(c + nxt)
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            out.append(c)
            i += 1
            if pattern.startswith("^", i):  # a negation and a leading "]" are part of the class, not its end
                out.append("^")
                i += 1
            if pattern.startswith("]", i):
                out.append("]")
                i += 1
            continue
        if c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def lark_grammar(grammar: str, label: str = "the grammar") -> Guidance:
    return Guidance("lark_grammar", grammar, label)


# -- the command line ------------------------------------------------------------------------------------------------

def from_cli(json_schema_arg: str | None = None, json_object_flag: bool = False, regex_arg: str | None = None,
             grammar_arg: str | None = None) -> Guidance | None:
    """`--json-schema FILE_OR_JSON`, `--json-object`, `--regex PATTERN`, `--grammar FILE.lark`: at most one."""
    given = [name for name, value in (("--json-schema", json_schema_arg), ("--json-object", json_object_flag),
                                      ("--regex", regex_arg), ("--grammar", grammar_arg)) if value]
    if len(given) > 1:
        raise GuidanceError(f"{' and '.join(given)} cannot be combined: give one output constraint")
    if json_schema_arg:
        return json_schema(_schema_arg(json_schema_arg), "--json-schema")
    if json_object_flag:
        return json_object("--json-object")
    if regex_arg:
        return regex(regex_arg, "--regex")
    if grammar_arg:
        return lark_grammar(_read_text(grammar_arg, "--grammar"), "--grammar")
    return None


def from_values(json_schema_value: dict | str | None = None, json_object_flag: bool = False,
                regex_value: str | None = None, grammar_value: str | None = None) -> Guidance | None:
    """The Python API's keywords: `json_schema` (a dict or JSON text), `json_object`, `regex`, `grammar` (Lark
    text): at most one, named in messages as the keyword is."""
    given = [name for name, value in (("json_schema", json_schema_value), ("json_object", json_object_flag),
                                      ("regex", regex_value), ("grammar", grammar_value)) if value]
    if len(given) > 1:
        raise GuidanceError(f"{' and '.join(given)} cannot be combined: give one output constraint")
    for name, value in (("regex", regex_value), ("grammar", grammar_value)):
        if value is not None and not isinstance(value, str):
            raise GuidanceError(f"{name} must be a string, got {_json_type(value)}")
    if json_schema_value:
        schema = json_schema_value
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise GuidanceError(f"json_schema is not valid JSON ({exc})") from None
        return json_schema(schema, "json_schema")
    if json_object_flag:
        return json_object("json_object")
    if regex_value:
        return regex(regex_value, "regex")
    if grammar_value:
        return lark_grammar(grammar_value, "grammar")
    return None


def _schema_arg(arg: str) -> object:
    """Inline JSON when it starts with `{`, else a file holding it."""
    text = arg if arg.lstrip().startswith("{") else _read_text(arg, "--json-schema")
    try:
        return json.loads(text)
    except RecursionError:
        raise GuidanceError(f"--json-schema nests deeper than {constraint_limits.MAX_DEPTH} levels") from None
    except ValueError as exc:
        where = "--json-schema" if text is arg else f"--json-schema file {arg}"
        raise GuidanceError(f"{where} is not valid JSON ({exc})") from None


def _read_text(path: str, option: str) -> str:
    p = Path(path).expanduser()
    try:
        is_file = p.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        is_file = False
    if not is_file:
        raise GuidanceError(f"{option}: no such file {path[:200]}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GuidanceError(f"{option}: {path} is not UTF-8 text") from None
    except OSError as exc:
        raise GuidanceError(f"{option}: cannot read {path}: {exc.strerror or exc}") from None


# -- og's messages -----------------------------------------------------------------------------------------------

def compile_error(guidance: Guidance, exc: BaseException) -> GuidanceError:
    """og's multi-line grammar error (with its caret lines) as one sentence; llguidance's internals (a Rust panic,
    a backtrace, a parser-state dump) go to the log, not into the message."""
    text = str(exc)
    text = text.split("Error creating grammar:", 1)[-1]
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not set(line) <= set("^ |") and not re.match(r"^\d+ \| ", line)]
    message = public_reason(" ".join(lines))
    if message is None:
        log.warning("%s: og's constraint compiler failed: %s", guidance.label, str(exc)[:2000])
        return GuidanceError(f"{guidance.label} cannot be compiled: it is too large or too complex for "
                             f"onnxruntime-genai's constraint compiler")
    return GuidanceError(f"{guidance.label} cannot be compiled: {message}")


def public_reason(text: str) -> str | None:
    """og's message without llguidance's internals: cut at a state dump or backtrace, at most 300 characters;
    None for a panic (an assertion inside the library says nothing the user can act on)."""
    text = text.strip()
    if not text or text.startswith("panic") or "panicked at" in text:
        return None
    for marker in INTERNALS:
        text = text.split(marker, 1)[0]
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def is_guidance_failure(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("Error committing tokens" in text or "Error computing mask" in text)


def decode_failure(exc: BaseException, generated: int) -> GuidanceFailed:
    log.warning("og's constrained decoder failed after %d tokens: %s", generated, str(exc)[:2000])
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    reason = public_reason(first)
    return GuidanceFailed(f"onnxruntime-genai's constrained decoder failed after {generated} tokens"
                          + (f": {reason}" if reason else ""))


# -- the guarantee -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """What a guided answer is: complete (with the parsed JSON value for a schema) or the problem, one sentence."""

    complete: bool
    parsed: object = None
    has_parsed: bool = False
    problem: str | None = None


def outcome(guidance: Guidance | None, text: str, finish_reason: str, generated_tokens: int,
            budget_hint: str = "raise --max-new-tokens") -> Outcome:
    """Check a finished answer against its constraint (no constraint: always complete)."""
    if guidance is None:
        return Outcome(True)
    what = WHAT[guidance.kind]
    if finish_reason != "stop":
        return Outcome(False, problem=f"the answer was cut at {generated_tokens} tokens before the {what} was "
                                      f"complete ({budget_hint})")
    if guidance.is_json:
        try:
            return Outcome(True, json.loads(text), True)
        except ValueError as exc:
            return Outcome(False, problem=f"the answer is not valid JSON ({exc})")
    if guidance.kind == "regex":
        try:
            matched = re.fullmatch(guidance.data, text) is not None
        except re.error:  # og's (Rust) regex syntax that Python's re does not read: og's mask is the check
            matched = True
        if not matched:
            return Outcome(False, problem="the answer does not match the regex")
    return Outcome(True)


def _json_type(value) -> str:
    return {list: "a list", bool: "true/false", type(None): "null", str: "a string", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)
