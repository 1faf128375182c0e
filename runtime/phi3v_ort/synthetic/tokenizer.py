"""Tokenizer files with the release's layout: Llama-style BPE, byte fallback, 32000 base ids, added tokens.

The vocabulary itself is learned (with the `tokenizers` trainer) from a small English corpus kept here plus
seeded pseudo-words, so every preset gets real merges and real byte fallback, and the special tokens sit at
exactly the release's ids. The JSON is written by hand in the release's structure (normalizer, no
pre-tokenizer, template post-processor, Replace/ByteFallback/Fuse/Strip decoder) so onnxruntime-extensions
parses it the way it parses the real file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from phi3v_ort.package import contract

_CORPUS = """\
Could you please introduce this stock to me? Help me get the title and author information of this book.
What is difference in this two images? Describe the chart in detail. The line shows the price of the stock
over the last year, with a sharp rise in the spring and a slow decline after the summer. The book cover shows
a title in large letters, the name of the author below it, and a picture of a lighthouse by the sea.
The first image shows a cat sitting on a red chair; the second image shows a dog lying on a blue sofa.
Read the text in the image and answer the question. There are three people in the picture, two of them are
smiling. The table lists revenue, profit and growth for each quarter of the year 2024 and 2025.
The quick brown fox jumps over the lazy dog. A small model that runs on the local machine is fast and private.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 42% $19.99. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / \\ @ # & *
"""
_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
_WEIGHTS = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5,
            1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
META = "\u2581"  # SentencePiece's word-boundary marker


def _corpus(seed: int, words: int) -> list[str]:
    rng = random.Random(seed)
    lines = _CORPUS.splitlines()
    out = lines * 20
    line: list[str] = []
    for _ in range(words):
        n = rng.choice((1, 2, 2, 3, 3, 4, 4, 5, 6, 7, 8))
        word = "".join(rng.choices(_LETTERS, _WEIGHTS, k=n))
        line.append(word.capitalize() if rng.random() < 0.1 else word)
        if len(line) == 16:
            out.append(" ".join(line))
            line = []
    return out


def _train_pieces(base_vocab_size: int, seed: int) -> tuple[list[str], list[str]]:
    """Learn (pieces, merges): the pieces exclude the specials and the 256 byte tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    room = base_vocab_size - 3 - 256
    tok = Tokenizer(models.BPE(unk_token=contract.UNK, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=room, show_progress=False, special_tokens=[],
                                  initial_alphabet=[META], limit_alphabet=200)
    tok.train_from_iterator(_corpus(seed, words=max(20_000, base_vocab_size * 12)), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    pieces = [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    # Pad with unreachable pieces if the corpus ran out of merges, so ids keep the release's positions.
    k = 0
    while len(pieces) < room:
        pieces.append(f"{META}unused{k}")
        k += 1
    return pieces[:room], merges


def _added(token_id: int, content: str, *, rstrip: bool, special: bool) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False,
            "rstrip": rstrip, "normalized": False, "special": special}


def added_tokens(base_vocab_size: int = contract.BASE_VOCAB_SIZE) -> list[dict]:
    """The added-token entries of tokenizer.json: <unk>, <s>, </s>, then the chat tokens after the base vocab."""
    out = [_added(0, contract.UNK, rstrip=False, special=True),
           _added(1, contract.BOS, rstrip=False, special=True),
           _added(2, contract.EOS_TEXT, rstrip=True, special=False)]
    out += [_added(base_vocab_size + off, content, rstrip=rstrip, special=True)
            for off, content, rstrip in contract.ADDED_TOKENS]
    return out


def tokenizer_json(base_vocab_size: int = contract.BASE_VOCAB_SIZE, seed: int = 0) -> dict:
    pieces, merges = _train_pieces(base_vocab_size, seed)
    vocab = [contract.UNK, contract.BOS, contract.EOS_TEXT] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    index = {p: i for i, p in enumerate(vocab)}
    merges = [m for m in merges if "".join(m.split(" ")) in index]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens(base_vocab_size),
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": META},
            {"type": "Replace", "pattern": {"String": " "}, "content": META},
        ]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": contract.BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": contract.BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": contract.BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {contract.BOS: {"id": contract.BOS, "ids": [contract.BOS_TOKEN_ID],
                                              "tokens": [contract.BOS]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": META}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": contract.UNK, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": index, "merges": merges,
        },
    }


def tokenizer_config(base_vocab_size: int, context_length: int) -> dict:
    decoder = {}
    for entry in added_tokens(base_vocab_size):
        decoder[str(entry["id"])] = {k: entry[k] for k in
                                     ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": None,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|system|>", "<|end|>", "<|user|>", "<|end|>"],
        "bos_token": contract.BOS,
        "chat_template": contract.CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": context_length,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": contract.UNK,
        "use_default_system_prompt": False,
    }


def special_tokens_map() -> dict:
    def tok(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {
        "additional_special_tokens": ["<|system|>", "<|end|>", "<|user|>", "<|end|>"],
        "bos_token": tok(contract.BOS),
        "eos_token": tok("<|endoftext|>"),
        "pad_token": tok("<|endoftext|>"),
        "unk_token": tok(contract.UNK),
    }


def write_tokenizer(out_dir: Path, *, base_vocab_size: int = contract.BASE_VOCAB_SIZE,
                    context_length: int = contract.CONTEXT_LENGTH, seed: int = 0) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir."""
    out_dir = Path(out_dir)
    files = {
        "tokenizer.json": tokenizer_json(base_vocab_size, seed),
        "tokenizer_config.json": tokenizer_config(base_vocab_size, context_length),
        "special_tokens_map.json": special_tokens_map(),
    }
    for name, data in files.items():
        (out_dir / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
