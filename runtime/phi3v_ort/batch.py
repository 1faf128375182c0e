"""Batch runs: many items, unattended, crash-safe, with image preparation running ahead of generation.

- Items come from a JSONL file (`{"id": ..., "images": [...], "question": ...}` per line) or a folder of images
  (one item per image, the same question for all).
- A bounded pool of worker threads loads and checks the next items' images (Pillow) and runs og's processor on
  them while the model generates the current one; at most `prefetch` items wait prepared, so memory stays
  bounded. og 0.18's Python bindings hold the GIL during its calls, so og's processor cannot truly overlap
  generation; Pillow's decoding releases the GIL and does (see the batch benchmark for where the time goes).
- Each result line is written and flushed as soon as its item is done; a failing item becomes a line with an
  `error` field and the run goes on. Re-running with the same output skips ids already there (resume); a
  truncated last line from an interrupted run is cut off before appending, so the file stays valid JSONL.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import Phi3vError
from .generation import Finished, Prepared, prepare, stream_prepared
from .images import load_image
from .loading import LoadedModel
from .settings import GenerationSettings

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Item:
    id: str
    images: tuple[str, ...]
    question: str


def read_items(source: str | Path, question: str | None = None) -> list[Item]:
    """Items from a JSONL file, or one per image of a folder (sorted by name) with `question`."""
    source = Path(source)
    if source.is_dir():
        if not question:
            raise Phi3vError("a folder of images needs --question")
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return [Item(str(p.relative_to(source)), (str(p),), question) for p in files]
    if not source.is_file():
        raise Phi3vError(f"batch input not found: {source}")
    items, seen = [], set()
    for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            item = Item(str(row["id"]), tuple(str(i) for i in row.get("images", [])), row.get("question") or question)
        except (ValueError, KeyError, TypeError) as exc:
            raise Phi3vError(f"{source} line {n} is not an item ({exc}): expected "
                             '{"id": ..., "images": [...], "question": ...}') from None
        if not item.question:
            raise Phi3vError(f"{source} line {n} has no question (and no --question was given)")
        if item.id in seen:
            raise Phi3vError(f"{source} line {n} repeats the id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    return items


def done_ids(output: Path) -> set[str]:
    """Ids already in the output; a truncated last line (an interrupted write) is removed first."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with output.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    ids = set()
    for line in data.decode("utf-8").splitlines():
        try:
            ids.add(str(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            continue
    return ids


@dataclass
class Progress:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    tokens: int = 0
    started: float = 0.0


def _prepare(model: LoadedModel, item: Item) -> Prepared:
    images = [load_image(src) for src in item.images]
    return prepare(model, item.question, images)


def run_batch(model: LoadedModel, items: list[Item], output: Path, settings: GenerationSettings,
              workers: int = 2, prefetch: int = 4, on_progress=None) -> Progress:
    """Answer every item not yet in `output`, appending one JSON line per item."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    skip = done_ids(output)
    todo = [it for it in items if it.id not in skip]
    progress = Progress(skipped=len(items) - len(todo), started=time.perf_counter())
    with output.open("a", encoding="utf-8") as out, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque[tuple[Item, Future]] = deque()
        queue = iter(todo)

        def refill() -> None:
            while len(pending) < max(1, prefetch):
                item = next(queue, None)
                if item is None:
                    return
                if prefetch > 0:
                    future = pool.submit(_prepare, model, item)
                else:  # strictly sequential: prepare only when the previous item is written
                    future = Future()
                    try:
                        future.set_result(_prepare(model, item))
                    except Exception as exc:  # noqa: BLE001 - delivered to _answer like a pool failure
                        future.set_exception(exc)
                pending.append((item, future))

        refill()
        try:
            while pending:
                item, future = pending.popleft()
                if prefetch > 0:
                    refill()  # keep the pool busy with the next items while this one generates
                out.write(json.dumps(_answer(model, item, future, settings, progress), ensure_ascii=False) + "\n")
                out.flush()
                os.fsync(out.fileno())
                if on_progress:
                    on_progress(progress)
                if prefetch <= 0:
                    refill()
        finally:
            for _, future in pending:
                future.cancel()
    return progress


def _answer(model: LoadedModel, item: Item, future: Future, settings: GenerationSettings, progress: Progress) -> dict:
    try:
        prepared = future.result()
        finished = None
        for event in stream_prepared(model, prepared, settings):
            if isinstance(event, Finished):
                finished = event
        assert finished is not None
    except Exception as exc:  # noqa: BLE001 - a bad item never stops the run; Ctrl-C (not an Exception) does
        progress.failed += 1
        message = str(exc) if isinstance(exc, Phi3vError) else f"{type(exc).__name__}: {str(exc).strip()}"
        return {"id": item.id, "images": list(item.images), "question": item.question, "error": message}
    progress.done += 1
    progress.tokens += finished.stats.generated_tokens
    return {"id": item.id, "images": list(item.images), "question": item.question, "answer": finished.text,
            "token_ids": list(finished.token_ids), "stats": finished.stats.to_dict()}

