"""`phi3v-ort chat` through a running server: the chat loop's conversation, answered by the server.

The client keeps the transcript (questions, images as read, answers) and sends it whole each turn, as an OpenAI
client does; the server sees a conversation it answered and continues its kept KV cache (server/app.py), so a
follow-up costs what it costs in-process. What differs from engine.conversation.Conversation, and why:
- Images are checked when attached only as far as decoding (the server prepares them; a package it serves need
  not be on this machine); their token counts for the phase line follow the release's formula (contract.py).
- When the transcript outgrows the context, the oldest turns are dropped, as the in-process chat does: the
  server refuses a request whose prompt + max_tokens exceeds the context (the in-process chat's own rule while
  max_tokens is at most half the context, the case for every published package), and the turn is retried
  without the oldest turn, with the same notice.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass

from phi3v_ort.engine.events import Finished, Notice
from phi3v_ort.errors import Phi3vError
from phi3v_ort.package import contract
from phi3v_ort.client.answer import HistoryTurn, PromptTooLong, ServerClient, TextDelta


@dataclass
class ServedTurn:
    question: str
    images: list  # ImageInputs
    answer: str = ""
    answer_ids: tuple[int, ...] = ()


class ImageTokens:
    """The chat loop's view of the input pipeline: image tokens per attached image (the release's formula)."""

    def __init__(self, processor: str, crops: int | None):
        self.crops = contract.MAX_CROPS if processor == "og" or crops is None else crops

    def image_tokens(self, image) -> int:
        return contract.image_tokens_for(image.width, image.height, self.crops)


class ServedConversation:
    """The face of engine.conversation.Conversation that cli/chat_loop.py uses, answered by a server."""

    def __init__(self, client: ServerClient, settings, system: str | None = None, processor: str = "own",
                 crops: int | None = None):
        self.client, self.settings, self.system, self.crops = client, settings, system, crops
        self.pipeline = ImageTokens(processor, crops)
        self.turns: list[ServedTurn] = []
        self.last_stats = None

    def prepare_image(self, image):
        return image  # decoded and checked when read; the server prepares it

    def reset(self) -> None:
        self.turns.clear()
        self.last_stats = None

    @property
    def images(self) -> list:
        return [img for turn in self.turns for img in turn.images]

    def ask(self, question: str, images: Sequence = ()) -> Iterator[TextDelta | Notice | Finished]:
        """One turn: streamed from the server, the oldest turns dropped (with a notice) while it does not fit."""
        kept = list(self.turns)
        while True:
            history = [HistoryTurn(t.question, t.images, t.answer) for t in kept]
            events = self.client.stream(question, list(images), self.settings, self.system, self.crops, history,
                                        cap_max_tokens=False)
            try:
                first = next(events)
            except PromptTooLong as exc:
                if not kept:
                    raise self._alone(exc) from None
                kept.pop(0)
                continue
            break
        if len(kept) < len(self.turns):
            yield Notice(f"dropped the {len(self.turns) - len(kept)} oldest turn(s) to fit the context")
        turn = ServedTurn(question, list(images))
        self.turns = kept + [turn]
        yield from self._stream(turn, first, events)

    def _stream(self, turn: ServedTurn, first, events) -> Iterator[TextDelta | Finished]:
        with closing(events):
            for event in itertools.chain([first], events):
                if isinstance(event, Finished):
                    turn.answer, turn.answer_ids = event.text, event.token_ids
                    self.last_stats = event.stats
                else:
                    turn.answer += event.text
                yield event

    def _alone(self, exc: PromptTooLong) -> Phi3vError:
        """A turn that cannot fit even alone: the in-process chat's sentence."""
        return Phi3vError(f"this turn alone needs {exc.prompt_tokens} prompt tokens + {self.settings.max_new_tokens} "
                          f"for the answer, but the model's context is {exc.context} tokens: the conversation is "
                          "kept as it was")

    def to_dict(self) -> dict:
        """The transcript, for /save (as Conversation.to_dict)."""
        return {"system": self.system,
                "turns": [{"question": t.question, "images": [i.source for i in t.images], "answer": t.answer,
                           "answer_ids": list(t.answer_ids)} for t in self.turns],
                "last_stats": self.last_stats.to_dict() if self.last_stats else None}
