"""Stop strings: text that ends an answer where it first appears (OpenAI's `stop`), the string itself left out.

One rule for every surface that takes them (the server's `stop` field, the Python API's `stop=`): at most
`MAX_STOPS` non-empty strings, as OpenAI allows. og 0.18 has no stop strings of its own, so the answer's text is
cut here, across token boundaries, and the caller stops generating.
"""

from __future__ import annotations

from collections.abc import Sequence

from phi3v_ort.errors import SettingError

MAX_STOPS = 4


def check_stops(stop: str | Sequence[str] | None) -> list[str]:
    """`stop` as a list of strings, or one sentence saying what is wrong with it.

    >>> check_stops("\\n\\n")
    ['\\n\\n']
    """
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, (list, tuple)) and len(stops) <= MAX_STOPS
            and all(isinstance(s, str) and s for s in stops)):
        raise SettingError(f"stop must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings")
    return list(stops)


class StopStringFilter:
    """Cuts streamed text at the first stop string, across deltas, without ever emitting a piece of one.

    `feed(delta)` returns the text safe to send now; it holds back the longest tail that could still grow into a
    stop string. When a stop string completes, it returns the text before it and `stopped` becomes true (later
    feeds return ""). `flush()` returns the held-back tail once generation has ended without a stop.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.stopped = False
        self._held = ""

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[:min(hits)]
        keep = self._partial_tail(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        tail, self._held = self._held, ""
        return tail

    def _partial_tail(self, text: str) -> int:
        """The length of the longest suffix of text that is a proper prefix of a stop string."""
        longest = max((len(s) for s in self.stops), default=1) - 1
        for k in range(min(longest, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
