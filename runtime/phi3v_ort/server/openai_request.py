"""An OpenAI chat-completions request body, checked and turned into what phi3v-ort will run. Pure: no server
framework, no image decoding, no model.

Why strict: a field phi3v-ort cannot honour must not be dropped silently (a client asking for `n: 3` or
`logprobs: true` would otherwise get something it did not ask for, and a typo such as `max_token` would go
unnoticed), and a value og cannot take must be a 400 here, not a 500 from inside og.

The field rule:
- Known fields are type- and range-checked; a bad value is a 400 whose `param` names the field.
- Fields asking for what phi3v-ort does not do are a 400 naming them unless they hold their "off" value:
  `n` (1), `logprobs` (false), `top_logprobs`, `tools`/`functions` (empty), `tool_choice`/`function_call`
  ("none"), `logit_bias` (empty), `frequency_penalty`/`presence_penalty` (0), `parallel_tool_calls` (false),
  `modalities` (["text"]).
- `response_format` (structured output, guidance.py): `{"type": "text"}`, `{"type": "json_object"}` or
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}`; anything else is a 400
  naming response_format. `strict` is accepted either way: the schema always constrains decoding. Whether og can
  compile the schema is known only where the model is (a worker): a 400 naming response_format from there.
- Fields that only describe the request to OpenAI's platform are accepted and ignored: `model` (the server serves
  one model), `user`, `metadata`, `store`, `service_tier`.
- Extensions: `top_k` (1..100000, as vLLM takes it), `crops` (1..16, phi3v-ort's crop budget per image) and
  `phi3v` (token ids, stats, a regex or grammar constraint: extension.py).
- `null` means "not given" for every known field. Any other field is a 400 naming it, whatever its value.
- `temperature` 0 or absent is greedy decoding; above 0 (at most 2) samples.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from urllib.parse import urlparse

from phi3v_ort.engine import guidance
from phi3v_ort.errors import Phi3vError
from phi3v_ort.engine.guidance import Guidance
from phi3v_ort.engine.settings import INT32_MAX, SEED_MAX, GenerationSettings
from phi3v_ort.engine.stop import StopStringFilter, check_stops  # noqa: F401 (StopStringFilter: its old home)
from phi3v_ort.server.extension import Extension, ExtensionError, parse_extension
parse_extension
from phi3v_ort.inputs.prompt import Turn, check_unicode

MAX_JSON_DEPTH = 64  # a chat request nests about 6 deep; this bounds the work any later walk of the body does
MAX_CROPS = 16
MAX_TOP_K = 100_000

ROLES = ("system", "developer", "user", "assistant")
IGNORED_FIELDS = ("model", "user", "metadata", "store", "service_tier")
KNOWN_FIELDS = frozenset(IGNORED_FIELDS + (
    "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stream",
    "stream_options", "stop", "n", "logprobs", "top_logprobs", "tools", "tool_choice", "functions",
    "function_call", "logit_bias", "frequency_penalty", "presence_penalty", "parallel_tool_calls", "modalities",
    "response_format", "crops", "phi3v"))


class ApiError(Exception):
    """A request that cannot be served, as OpenAI reports it: an HTTP status and an `{"error": {...}}` body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str | None, message: str, status: int = 400) -> ApiError:
    return ApiError(status, message, param=param)


def _show(value: object) -> str:
    """A value as the client wrote it, cut short."""
    return json.dumps(value, default=str)[:40]


# -- the body --------------------------------------------------------------------------------------------------------

def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes) -> dict:
    """The body as a dict; invalid JSON (NaN and Infinity included), a non-object or deep nesting is a 400."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:  # the C scanner guards its own recursion: 100,000 `[` end here, not in a crash
        raise _bad(None, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:  # JSONDecodeError, invalid UTF-8, NaN/Infinity, an integer too long to convert
        raise _bad(None, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise _bad(None, "the request body must be a JSON object")
    stack: list[tuple[object, int, str]] = [(data, 1, "")]
    while stack:  # iterative, so a body just under the recursion limit costs no recursion later either
        value, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _bad(None, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            for key, child in value.items():
                where = f"{path}.{key}" if path else key
                _check_text(key, f"a key in {path or 'the request body'}", path or None)
                stack.append((child, depth + 1, where))
        elif isinstance(value, list):
            stack.extend((child, depth + 1, f"{path}[{i}]") for i, child in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path, path)
    return data


def _check_text(text: str, what: str, param: str | None) -> None:
    """A lone surrogate anywhere in the body (JSON's `\\ud800`: what JavaScript's slice leaves of an emoji) is a 400
    naming where: no tokenizer, constraint compiler or UTF-8 writer downstream takes it."""
    if not text.isascii():
        try:
            check_unicode(text, what)
        except Phi3vError as exc:
            raise _bad(param, str(exc)) from None


# -- what comes out --------------------------------------------------------------------------------------------------

@dataclass
class ImageRef:
    """An image as the request gave it, not yet decoded (that happens later, in a bounded pool): the bytes of a
    base64 data: URI, or an http(s) URL that still has to pass the server's remote-image checks."""

    index: int  # the message it came from
    data: bytes | None = None
    url: str | None = None


HistoryTurn = Turn  # an earlier user turn and the assistant's answer; images as ImageRefs (the one turn type)


@dataclass
class ParsedRequest:
    system: str | None
    history: list[HistoryTurn]
    question: str
    images: list[ImageRef]
    settings: GenerationSettings
    stream: bool
    include_usage: bool
    stop: list[str]
    crops: int | None = None  # phi3v-ort's crop budget per image (extension); None: the model's default
    response_format: dict | None = None  # as given; its constraint is settings.guidance
    phi3v: Extension | None = None  # phi3v-ort's opt-in extension (extension.py)


# -- field checks ----------------------------------------------------------------------------------------------------

def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"{name} must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise _bad(name, f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _number(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, f"{name} must be a number, got {_show(value)}")
    value = float(value)
    if not math.isfinite(value) or not (lo < value if lo_open else lo <= value) or value > hi:
        raise _bad(name, f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value}")
    return value


def _bool(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _bad(name, f"{name} must be true or false, got {_show(value)}")
    return value


def _only_off(body: dict, name: str, off: tuple, what: str) -> None:
    """A field phi3v-ort accepts only with its "off" value (or null)."""
    value = body.get(name)
    if value is not None and not any(value == o and type(value) is type(o) for o in off):
        raise _bad(name, f"{name} is not supported by phi3v-ort ({what})")


def _check_fields(body: dict) -> None:
    unknown = sorted(k for k in body if k not in KNOWN_FIELDS)
    if unknown:
        raise _bad(unknown[0], f"unknown field {unknown[0]!r}: phi3v-ort does not support it")
    _only_off(body, "n", (1,), "it returns one choice")
    _only_off(body, "logprobs", (False,), "no log probabilities")
    _only_off(body, "top_logprobs", (), "no log probabilities")
    for name in ("tools", "functions"):
        _only_off(body, name, ([],), "no tool calling")
    for name in ("tool_choice", "function_call"):
        _only_off(body, name, ("none",), "no tool calling")
    _only_off(body, "parallel_tool_calls", (False,), "no tool calling")
    _only_off(body, "logit_bias", ({},), "no logit bias")
    for name in ("frequency_penalty", "presence_penalty"):
        _only_off(body, name, (0, 0.0), "only 0")
    _only_off(body, "modalities", (["text"],), "text output only")
    for name, kind, what in (("model", str, "a string"), ("user", str, "a string"), ("service_tier", str, "a string"),
                             ("metadata", dict, "an object"), ("store", bool, "true or false")):
        if body.get(name) is not None and not isinstance(body[name], kind):
            raise _bad(name, f"{name} must be {what}")


def _stop(body: dict) -> list[str]:
    try:
        return check_stops(body.get("stop"))
    except Phi3vError as exc:
        raise _bad("stop", str(exc)) from None


def _stream_options(body: dict, stream: bool) -> bool:
    """include_usage; stream_options without stream is refused, as OpenAI does."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _bad("stream_options", "stream_options must be an object")
    if not stream:
        raise _bad("stream_options", "stream_options is only allowed when stream is true")
    for key, value in options.items():
        if key not in ("include_usage", "include_obfuscation"):
            raise _bad(f"stream_options.{key}", f"unknown field stream_options.{key}")
        if value is not None and not isinstance(value, bool):
            raise _bad(f"stream_options.{key}", f"stream_options.{key} must be true or false")
    return bool(options.get("include_usage"))


RESPONSE_FORMAT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _response_format(body: dict) -> Guidance | None:
    """OpenAI's response_format as an output constraint (None for text)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise _bad("response_format", 'response_format must be an object with a type: "text", "json_object" or '
                                      '"json_schema"')
    kind = rf["type"]
    allowed = {"text": ("type",), "json_object": ("type",), "json_schema": ("type", "json_schema")}.get(kind)
    if allowed is None:
        raise _bad("response_format.type", f'response_format.type must be "text", "json_object" or "json_schema", '
                                           f"got {_show(kind)}")
    extra = sorted(k for k in rf if k not in allowed)
    if extra:
        raise _bad(f"response_format.{extra[0]}", f"unknown field response_format.{extra[0]} for type {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return guidance.json_object("response_format")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad("response_format.json_schema", "response_format.json_schema must be an object with a name and "
                                                  "a schema")
    extra = sorted(k for k in spec if k not in ("name", "schema", "strict", "description"))
    if extra:
        raise _bad(f"response_format.json_schema.{extra[0]}", f"unknown field response_format.json_schema.{extra[0]}")
    name = spec.get("name")
    if not isinstance(name, str) or not RESPONSE_FORMAT_NAME.fullmatch(name):
        raise _bad("response_format.json_schema.name", "response_format.json_schema.name must be 1-64 letters, "
                                                       f"digits, _ or -, got {_show(name)}")
    for key, kind_, what in (("strict", bool, "true or false"), ("description", str, "a string")):
        if spec.get(key) is not None and not isinstance(spec[key], kind_):
            raise _bad(f"response_format.json_schema.{key}", f"response_format.json_schema.{key} must be {what}")
    param = "response_format.json_schema.schema"
    if "schema" not in spec:
        raise _bad(param, f"{param} is missing: give the JSON schema the answer must follow")
    try:
        return guidance.json_schema(spec["schema"], param)
    except Phi3vError as exc:
        raise _bad(param, str(exc)) from None


# -- messages --------------------------------------------------------------------------------------------------------

def _content(message: dict, i: int) -> tuple[str, list[tuple[str, str]]]:
    """The text of a message and its image URLs with their params, nothing decoded yet."""
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list) or not content:
        raise _bad(f"messages[{i}].content", f"messages[{i}] has no content")
    texts: list[str] = []
    urls: list[tuple[str, str]] = []
    for j, part in enumerate(content):
        param = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"{param}.text", f"messages[{i}] has a text part without a string text")
            texts.append(part["text"])
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise _bad(f"{param}.image_url", f"messages[{i}] has an image_url part without a url")
            if isinstance(spec, dict) and spec.get("detail") not in (None, "auto", "low", "high"):
                raise _bad(f"{param}.image_url.detail", "image_url.detail must be auto, low or high")
            urls.append((url, f"{param}.image_url"))
        else:
            raise _bad(f"{param}.type", f"messages[{i}] has a content part of unsupported type {kind!r}")
    return "\n".join(texts), urls


def _image_ref(url: str, param: str, index: int, allow_remote: bool, max_image_bytes: int) -> ImageRef:
    """A data: URI is size-checked from its base64 length, then base64-decoded (never image-decoded) here."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise _bad(param, "image data URIs must be base64-encoded")
        size = len(payload) * 3 // 4 - payload[-2:].count("=")
        if size > max_image_bytes:
            raise _bad(param, f"an image is larger than {max_image_bytes / 2**20:g} MB", status=413)
        try:
            return ImageRef(index, data=base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError):
            raise _bad(param, "an image_url data URI holds invalid base64") from None
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise _bad(param, "image_url must be a data: URI or an http(s) URL")
    if not allow_remote:
        raise _bad(param, "remote image URLs are disabled on this server (start it with --allow-remote-images), "
                          "send the image as a data: URI")
    return ImageRef(index, url=url)


def _messages(body: dict, allow_remote: bool, max_images: int,
              max_image_bytes: int) -> tuple[str | None, list[HistoryTurn], HistoryTurn]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "messages must be a non-empty list")
    read: list[tuple[str, str, list[tuple[str, str]]]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role", f"messages[{i}] has an unsupported role {_show(role)}")
        if message.get("tool_calls"):
            raise _bad(f"messages[{i}].tool_calls", "tool calls are not supported by phi3v-ort")
        read.append((role, *_content(message, i)))
    # count every image before decoding any: a body of many large images is refused for the count alone
    if sum(len(urls) for _, _, urls in read) > max_images:
        raise _bad("messages", f"too many images: at most {max_images} per request")

    system_parts: list[str] = []
    turns: list[HistoryTurn] = []
    pending: HistoryTurn | None = None
    for i, (role, text, urls) in enumerate(read):
        if role in ("system", "developer"):
            if urls or turns or pending:
                raise _bad(f"messages[{i}]", f"messages[{i}]: system messages come first and carry text only")
            system_parts.append(text)
            continue
        if role == "assistant":
            if pending is None or urls:
                raise _bad(f"messages[{i}]", f"messages[{i}]: an assistant message must follow a user message "
                                             "and carry text only")
            pending.answer = text
            turns.append(pending)
            pending = None
            continue
        images = [_image_ref(url, param, i, allow_remote, max_image_bytes) for url, param in urls]
        if pending is not None:  # two user messages in a row: one turn
            pending.question += "\n" + text
            pending.images.extend(images)
        else:
            pending = HistoryTurn(text, images)
    if pending is None:
        raise _bad("messages", "the last message must come from the user")
    return "\n".join(system_parts) or None, turns, pending


# -- the request -----------------------------------------------------------------------------------------------------

def parse_request(body: dict, *, allow_remote: bool, max_images: int, max_image_bytes: int,
                  max_tokens_default: int) -> ParsedRequest:
    """Check every field (see the module docstring for the rule) and the messages; images are counted and
    size-checked but not decoded. Raises ApiError."""
    if not isinstance(body, dict):
        raise _bad(None, "the request body must be a JSON object")
    _check_fields(body)
    max_tokens = _int(body, "max_tokens", 1, INT32_MAX)
    max_completion_tokens = _int(body, "max_completion_tokens", 1, INT32_MAX)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1, lo_open=True)
    top_k = _int(body, "top_k", 1, MAX_TOP_K)
    seed = _int(body, "seed", 0, SEED_MAX)
    crops = _int(body, "crops", 1, MAX_CROPS)
    stream = bool(_bool(body, "stream"))
    include_usage = _stream_options(body, stream)
    stop = _stop(body)
    constraint = _response_format(body)
    try:
        extension = parse_extension(body.get("phi3v"))
    except ExtensionError as exc:
        raise _bad(exc.param, str(exc)) from None
    if extension is not None and extension.guidance is not None:
        if body.get("response_format") is not None:
            raise _bad("phi3v.guidance", "give either response_format or phi3v.guidance, not both")
        constraint = extension.guidance
    system, history, last = _messages(body, allow_remote, max_images, max_image_bytes)

    sampling = {"temperature": temperature} if temperature else {}  # 0 or absent: greedy
    sampling.update({k: v for k, v in (("top_p", top_p), ("top_k", top_k)) if v is not None})
    try:
        settings = GenerationSettings(max_new_tokens=max_completion_tokens or max_tokens or max_tokens_default,
                                      do_sample=bool(temperature), seed=seed, guidance=constraint, **sampling)
    except Phi3vError as exc:  # the checks above should leave nothing for this, but never a 500
        raise _bad(None, str(exc)) from None
    return ParsedRequest(system=system, history=history, question=last.question, images=last.images,
                         settings=settings, stream=stream, include_usage=include_usage, stop=stop, crops=crops,
                         response_format=body.get("response_format"), phi3v=extension)
