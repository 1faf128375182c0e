"""Prompt segments -> input ids, exactly as the model's reference processor (Phi3VProcessor) builds them.

The reference splits the prompt on `<|image_k|>` tags and tokenizes every chunk on its own with the tokenizer's
special tokens, so `input_ids` start with BOS and every chunk after an image starts with BOS again; image k becomes
-k repeated by its token count. og 0.18's processor adds no BOS at all (shared/docs/phi3v-release-contract.md).

The tokenizer is the `tokenizers` library reading the package's own tokenizer.json (the library behind the
reference's fast tokenizer), in two forms:
- the template's markers are looked up by name among the file's added tokens, with the whitespace they absorb
  (`rstrip`/`lstrip`, e.g. `<|assistant|>` eats the newline after it);
- text runs between markers go through a copy of the tokenizer that has no added tokens, so text never turns into
  a control token: a typed `<|end|>` gives the same pieces as any other characters.
A run between markers is what the reference tokenizes too (added tokens split the text before normalisation), so
for prompts without marker strings in people's text the ids are the reference's, id for id
(tests/inputs/test_inputs.py checks the golden file and a table of cases against the real Phi-3-vision tokenizer).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phi3v_ort.errors import Phi3vError
from phi3v_ort.inputs.prompt import (Control, Image, Segment, Text, Tokens, Turn, check_unicode, new_turn_start,
                                     transcript)


@dataclass(frozen=True)
class TranscriptIds:
    """A conversation's prompt, tokenized once by whoever prepared the request (the server, before it checks the
    context), so the model's process does not tokenize it again."""

    ids: np.ndarray  # int32 [n]: the whole transcript, what a fresh prefill feeds
    turn_start: int | None  # where the newest turn's own tokens start (its `<|end|>` of the last answer); None: first

    @property
    def continuation(self) -> np.ndarray | None:
        """The tokens a kept generator is continued with: exactly the suffix of a fresh prefill (tokens split at
        control markers, so the split is exact)."""
        return None if self.turn_start is None else self.ids[self.turn_start:]


class PromptTokenizer:
    """One package's tokenizer.json (+ tokenizer_config.json), turned into the reference's prompt ids."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        try:
            data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            config_path = folder / "tokenizer_config.json"
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
            self._added = {t["content"]: t for t in data.get("added_tokens", [])}
            plain = dict(data, added_tokens=[])
            self._plain = Tokenizer.from_str(json.dumps(plain))
        except Exception as exc:  # noqa: BLE001 - OSError, bad JSON, or the tokenizers library's own Exception
            raise Phi3vError(f"cannot read the tokenizer in {folder} ({exc})") from None
        self.max_token_chars = _max_token_chars(data)
        self.add_bos = bool(config.get("add_bos_token", True))
        bos = config.get("bos_token", "<s>")
        bos = bos.get("content", "<s>") if isinstance(bos, dict) else bos
        self.bos_id = self.control_id(bos)

    def control_id(self, token: str) -> int:
        entry = self._added.get(token)
        if entry is None:
            raise Phi3vError(f"the package's tokenizer has no token {token}")
        return int(entry["id"])

    def min_tokens(self, chars: int) -> int:
        """A lower bound on the tokens of `chars` characters of text, known without tokenizing it: no token covers
        more than `max_token_chars` characters. Checked before tokenizing, so a 30 MB message is refused at once
        (tokenizing it took 42.5 s and 4.1 GB)."""
        return chars // self.max_token_chars

    def control_strings_in(self, text: str) -> list[str]:
        """The added tokens' names that occur in `text` (what a tokenizer with special-token matching would turn
        into control ids)."""
        return [name for name in self._added if name in text]

    def encode_text(self, text: str) -> list[int]:
        """Plain text -> ids: never a control token (SentencePiece's leading word marker included, as the
        reference adds it to every run)."""
        check_unicode(text)  # the tokenizers library would raise a TypeError on it
        return self._plain.encode(text, add_special_tokens=False).ids if text else []

    def encode(self, segments: Sequence[Segment], image_tokens: Sequence[int] = (), start: bool = True) -> np.ndarray:
        """int32 [n] ids; image k's placeholders are -k, `image_tokens[k - 1]` of them. `start`: these segments
        begin a prompt (BOS first); a conversation's continuation does not."""
        return self._encode(segments, image_tokens, start)[0]

    def encode_conversation(self, system: str | None, turns: Sequence[Turn], new: Turn,
                            image_tokens: Sequence[int] = ()) -> TranscriptIds:
        """A conversation's transcript (prompt.transcript) in one pass, with where its newest turn starts."""
        segments = transcript(system, turns, new)
        ids, start = self._encode(segments, image_tokens, True, new_turn_start(segments, new, turns))
        return TranscriptIds(ids, start)

    def _encode(self, segments: Sequence[Segment], image_tokens: Sequence[int], start: bool,
                mark: int | None = None) -> tuple[np.ndarray, int | None]:
        """The ids, and where segment `mark` (a control marker) starts in them."""
        position = None
        ids: list[int] = []
        run: list[str] = []
        strip_left = False  # the last marker absorbs the whitespace after it

        def flush(next_lstrip: bool = False) -> None:
            nonlocal strip_left
            text = "".join(run)
            if strip_left:
                text = text.lstrip()
            if next_lstrip:
                text = text.rstrip()
            ids.extend(self.encode_text(text))
            run.clear()
            strip_left = False

        if self.add_bos and start:
            ids.append(self.bos_id)
        for index, seg in enumerate(segments):
            if isinstance(seg, Text):
                run.append(seg.text)
            elif isinstance(seg, Control):
                entry = self._added.get(seg.token)
                if entry is None:
                    raise Phi3vError(f"the package's tokenizer has no token {seg.token}")
                flush(bool(entry.get("lstrip")))
                if index == mark:
                    position = len(ids)
                ids.append(int(entry["id"]))
                strip_left = bool(entry.get("rstrip"))
            elif isinstance(seg, Tokens):
                flush()
                ids.extend(seg.ids)
            elif isinstance(seg, Image):
                flush()
                if not 1 <= seg.number <= len(image_tokens):
                    raise Phi3vError(f"the prompt has <|image_{seg.number}|> but {len(image_tokens)} image(s)")
                ids.extend([-seg.number] * int(image_tokens[seg.number - 1]))
                if self.add_bos:
                    ids.append(self.bos_id)  # the reference tokenizes the chunk after an image on its own
            else:
                raise TypeError(f"not a prompt segment: {seg!r}")
        flush()
        if mark is not None and position is None:
            raise ValueError(f"segment {mark} is not a control marker")
        return np.asarray(ids, dtype=np.int32), position


# Normalizers that never make the text shorter (Phi-3's: prepend "▁", replace " " by "▁"): the longest vocabulary
# entry bounds the characters a token covers. Any other (NFC composes characters, a regex Replace may drop some)
# gets this factor more, generously: what keeps the bound a bound, never a refusal of text that fits.
LENGTH_KEEPING_NORMALIZERS = ("Prepend", "Lowercase")
UNKNOWN_NORMALIZER_FACTOR = 4
NO_BOUND = 2**62  # characters per token when nothing bounds them: min_tokens is then always 0


def _max_token_chars(data: dict) -> int:
    """The most characters one token can stand for, from a tokenizer.json's vocabulary and normalizer."""
    model = data.get("model") or {}
    if model.get("fuse_unk") and not model.get("byte_fallback"):
        return NO_BOUND  # a run of unknown characters of any length is one <unk> token
    vocab = model.get("vocab") or {}
    entries = vocab.keys() if isinstance(vocab, dict) else [v[0] for v in vocab if v]  # BPE dict, Unigram pairs
    longest = max((len(str(e)) for e in entries), default=64)
    for added in data.get("added_tokens", []):
        longest = max(longest, len(str(added.get("content", ""))))
    return max(1, longest) * (1 if _keeps_length(data.get("normalizer")) else UNKNOWN_NORMALIZER_FACTOR)


def _keeps_length(normalizer: dict | None) -> bool:
    """Whether a normalizer can only keep or lengthen the text (so chars // longest token is a sound bound)."""
    if normalizer is None:
        return True
    kind = normalizer.get("type")
    if kind == "Sequence":
        return all(_keeps_length(n) for n in normalizer.get("normalizers", []))
    if kind == "Replace":
        pattern = normalizer.get("pattern", {})
        return "String" in pattern and len(normalizer.get("content", "")) >= len(pattern["String"])
    return kind in LENGTH_KEEPING_NORMALIZERS
