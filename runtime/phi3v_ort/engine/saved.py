"""A conversation saved with chat's `/save`, read back by `/load` to continue it.

The file is what Conversation.to_dict() writes: the system message, and per turn the question, its images (as
they were given: paths or URLs, read again now), the answer and the answer's token ids. Everything is read and
checked, and every image loaded and prepared, before the conversation changes: a bad file is one sentence and the
conversation goes on as it was. The next question re-prefills the whole transcript once (a new generator: og cannot
load a KV cache); answers keep their token ids, so the model reads exactly what it wrote.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from phi3v_ort.engine.conversation import Conversation, Turn
from phi3v_ort.errors import Phi3vError
from phi3v_ort.inputs.images import ImageInput, load_image


@dataclass(frozen=True)
class SavedTurn:
    question: str
    images: tuple[str, ...]
    answer: str
    answer_ids: tuple[int, ...]


@dataclass(frozen=True)
class SavedConversation:
    system: str | None
    turns: tuple[SavedTurn, ...]


def read_saved(path: str | Path) -> SavedConversation:
    """The transcript in a file written by /save, its shape checked; Phi3vError (one sentence) otherwise."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise Phi3vError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise Phi3vError(f"{path} is not a transcript saved with /save (not JSON: {exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("turns"), list) or \
            not isinstance(data.get("system"), (str, type(None))):
        raise Phi3vError(f"{path} is not a transcript saved with /save (it needs \"system\" and a \"turns\" list)")
    return SavedConversation(data["system"], tuple(_turn(t, k, path) for k, t in enumerate(data["turns"], 1)))


def _turn(row, number: int, path: Path) -> SavedTurn:
    def bad(what: str) -> Phi3vError:
        return Phi3vError(f"{path} is not a transcript saved with /save: turn {number} {what}")

    if not isinstance(row, dict):
        raise bad("is not an object")
    question, images = row.get("question"), row.get("images", [])
    answer, ids = row.get("answer", ""), row.get("answer_ids", [])
    if not isinstance(question, str) or not question:
        raise bad("has no question")
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise bad("has images that are not a list of paths or URLs")
    if not isinstance(answer, str):
        raise bad("has an answer that is not text")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise bad("has answer_ids that are not token ids")
    return SavedTurn(question, tuple(images), answer, tuple(ids))


def restore(conversation: Conversation, saved: SavedConversation,
            load: Callable[[str], ImageInput] = load_image) -> int:
    """Make `saved` the conversation's history (its images loaded and prepared again first); returns the number of
    turns. Token ids outside the model's vocabulary (a transcript of another model) are dropped: the answer's
    text is read instead."""
    vocab = conversation.model.info.vocab_size
    turns = []
    for number, t in enumerate(saved.turns, 1):
        images = []
        for source in t.images:
            if source == "stdin":
                raise Phi3vError(f"turn {number}'s image was read from stdin and cannot be read again")
            try:
                images.append(conversation.prepare_image(load(source)))
            except Phi3vError as exc:
                raise Phi3vError(f"turn {number}'s image cannot be loaded again: {exc}") from None
        ids = list(t.answer_ids) if all(i < vocab for i in t.answer_ids) else []
        turns.append(Turn(t.question, images, t.answer, ids))
    conversation.restore(saved.system, turns)
    return len(turns)
