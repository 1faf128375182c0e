"""The names a server answers to (issue 23 items 6 and 7): its model's id (first) and aliases, as /v1/models lists
them; a request naming another model is a 404 `model_not_found`, as OpenAI and vLLM answer, not an answer from a
model the client did not ask for. A request without `model` gets the served one (the web page and the CLI's client
send none)."""

from __future__ import annotations

from collections.abc import Iterable

from phi3v_ort.server.openai_request import ApiError

OWNER = "phi3v-ort"


def served_names(model_name: str, aliases: Iterable[str] = ()) -> tuple[str, ...]:
    """The id first, then each alias once (`phi-3-vision`, `phi-3-vision:cpu-int4`)."""
    return tuple(dict.fromkeys([model_name, *aliases]))


def check_model(requested: object, names: tuple[str, ...]) -> None:
    """Raises OpenAI's 404 `model_not_found` for a `model` this server does not serve (None: the served one)."""
    if requested is None or not isinstance(requested, str) or requested in names:
        return  # a non-string `model` is the request parser's 400
    shown = requested if len(requested) <= 80 else requested[:80] + "..."
    raise ApiError(404, f"The model `{shown}` does not exist: this server serves "
                        f"{', '.join(f'`{n}`' for n in names)}.", param="model", code="model_not_found")


def model_list(names: tuple[str, ...], processor: str) -> dict:
    """GET /v1/models: one entry per name (OpenAI's model object; `root`: the id an alias stands for)."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": OWNER,
                                        "root": names[0], "max_crops": 16, "default_crops": 16,
                                        "processor": processor} for name in names]}
