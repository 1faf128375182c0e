"""Generation through a running `phi3v-ort serve`: the same events as in-process generation, so the CLI prints an
answer the same way whichever side made it.

`ServerClient.stream()` sends one chat-completions request (streamed, with the `phi3v` extension asking for the
token ids and the engine's stats: extension.py) and yields a `TextDelta` per streamed piece of text, then the same
`Finished` (text, token ids, GenerationStats) in-process generation ends with. Images travel as data: URIs of the
bytes they were read as, so the server decodes exactly what the CLI would. Errors become the sentence the
in-process path says (a prompt that cannot fit, a constraint og cannot compile, a bad image); a server that cannot
take the request before any answer (nothing listens, busy, shutting down) is a `ServerUnavailable`, which
`--server auto` answers by running in-process.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

from phi3v_ort.engine.events import Finished, GenerationStats
from phi3v_ort.engine.settings import GenerationSettings
from phi3v_ort.errors import Phi3vError
from phi3v_ort.client.transport import post_json, sse_data
from phi3v_ort.inputs.prompt import Turn

CONTEXT_MESSAGE = re.compile(r"maximum context length is (\d+) tokens\. However, you requested \d+ tokens "
                             r"\((\d+) in the messages")


class ServerUnavailable(Phi3vError):
    """The server did not take the request (nothing listens, too busy, shutting down); nothing was generated."""


class PromptTooLong(Phi3vError):
    """The server refused the request for the context: `prompt_tokens` (the whole transcript) and `context`."""

    def __init__(self, message: str, prompt_tokens: int, context: int):
        super().__init__(message)
        self.prompt_tokens, self.context = prompt_tokens, context


@dataclass(frozen=True)
class TextDelta:
    """A piece of the answer as the server streamed it (the server's stream has text, not token ids)."""

    text: str


HistoryTurn = Turn  # an earlier turn of a chat: question, its images (ImageInputs), answer text (the one turn type)


def data_uri(data: bytes) -> str:
    """The image's bytes as they were read (the server decodes them as the CLI does, whatever the format)."""
    kind = ("png" if data.startswith(b"\x89PNG") else "jpeg" if data.startswith(b"\xff\xd8") else
            "gif" if data.startswith(b"GIF8") else "webp" if data[8:12] == b"WEBP" else None)
    mime = f"image/{kind}" if kind else "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def user_message(question: str, images: Sequence) -> dict:
    if not images:
        return {"role": "user", "content": question}
    return {"role": "user", "content": [{"type": "text", "text": question}]
            + [{"type": "image_url", "image_url": {"url": data_uri(img.data)}} for img in images]}


def request_body(question: str, images: Sequence, settings: GenerationSettings, system: str | None = None,
                 crops: int | None = None, history: Sequence[HistoryTurn] = (), cap_max_tokens: bool = True) -> dict:
    """The chat-completions request for one answer, asking for what in-process generation reports. Sampling:
    the server samples when temperature > 0, so a sampled request always names its temperature (the CLI samples
    at 1.0 when only --top-p or --top-k is given)."""
    from phi3v_ort.server.extension import guidance_body

    messages = [{"role": "system", "content": system}] if system is not None else []
    for turn in history:
        messages += [user_message(turn.question, turn.images), {"role": "assistant", "content": turn.answer}]
    messages.append(user_message(question, images))
    body: dict = {"messages": messages, "max_tokens": settings.max_new_tokens, "stream": True,
                  "phi3v": {"token_ids": True, "stats": True, "cap_max_tokens": cap_max_tokens}}
    if settings.do_sample:
        body.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
        if settings.seed is not None:
            body["seed"] = settings.seed
    if crops is not None:
        body["crops"] = crops
    if settings.guidance is not None:
        body["phi3v"]["guidance"] = guidance_body(settings.guidance)
    return body


def stats_from(data: dict) -> GenerationStats:
    """The engine's stats as the server sent them (fields this version does not know are left out)."""
    known = {f.name for f in fields(GenerationStats)}
    values = {k: v for k, v in data.items() if k in known}
    values["image_tokens"] = tuple(values.get("image_tokens", ()))
    return GenerationStats(**values)


class ServerClient:
    """One server, as a source of answers."""

    def __init__(self, url: str, api_key: str | None = None):
        from phi3v_ort.client.transport import base_url

        self.url = base_url(url)
        self.api_key = api_key

    def stream(self, question: str, images: Sequence = (), settings: GenerationSettings = GenerationSettings(),
               system: str | None = None, crops: int | None = None, history: Sequence[HistoryTurn] = (),
               cap_max_tokens: bool = True) -> Iterator[TextDelta | Finished]:
        """Ask for one answer; yields its text as it streams, then Finished. Closing the generator early (Ctrl-C)
        closes the connection, which cancels the generation on the server."""
        body = request_body(question, images, settings, system, crops, history, cap_max_tokens)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            conn, response = post_json(self.url, "/v1/chat/completions", body, headers)
        except OSError as exc:
            raise ServerUnavailable(f"the server at {self.url} does not answer ({exc.strerror or exc})") from None
        try:
            if response.status != 200:
                raise self.error(response.status, _json_or_empty(response.read()))
            yield from self._events(response)
        finally:
            conn.close()

    def _events(self, response) -> Iterator[TextDelta | Finished]:
        pieces: list[str] = []
        try:
            for data in sse_data(response):
                if "error" in data:
                    raise self.error(500, data)
                choice = (data.get("choices") or [{}])[0]
                text = choice.get("delta", {}).get("content")
                if text:
                    pieces.append(text)
                    yield TextDelta(text)
                if "phi3v" in data:
                    extra = data["phi3v"]
                    stats = stats_from(extra["stats"])
                    yield Finished(text="".join(pieces), token_ids=tuple(extra["token_ids"]), prompt="", stats=stats)
                    return
        except (OSError, ValueError) as exc:
            raise Phi3vError(f"the server at {self.url} stopped answering: {exc}") from None
        raise Phi3vError(f"the server at {self.url} ended the answer without its token ids (is it an older "
                         "phi3v-ort?)")

    def error(self, status: int, body: dict) -> Phi3vError:
        """The server's error as the in-process path would say it."""
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        message = error.get("message") or f"HTTP {status}"
        if status in (429, 503):
            return ServerUnavailable(f"the server at {self.url} cannot take the request now: {message}")
        if status == 401:
            return Phi3vError(f"the server at {self.url} refused the request ({message}): give its key with "
                              "--api-key or $PHI3V_ORT_API_KEY")
        found = CONTEXT_MESSAGE.search(message) if error.get("code") == "context_length_exceeded" else None
        if found:
            from phi3v_ort.engine.kv_cache import cannot_fit

            prompt, context = int(found.group(2)), int(found.group(1))
            return PromptTooLong(cannot_fit(prompt, context), prompt, context)
        return Phi3vError(message)


def _json_or_empty(raw: bytes) -> dict:
    import json

    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
