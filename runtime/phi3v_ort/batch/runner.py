"""Batch runs: many items, unattended, crash-safe, with image preparation running ahead of generation.

Input
- Items come from a JSONL file (`{"id": ..., "images": [...], "question": ...}` per line; `images` may be one
  path/URL as a string; `question` falls back to --question) or a folder of images (one item per image, sorted by
  name, the same question for all). Relative image paths in a JSONL file are relative to that file's folder;
  absolute paths, `~` paths and http(s) URLs are used as they are. The file must be UTF-8 (a BOM is allowed).
- A bad line (not JSON, no usable id, no question, `images` neither a string nor a list of strings, an id already
  used by an earlier line) never stops the batch: `read_batch` returns every problem with its line number next to
  the good items. A bad line with an id becomes an `error` line in the output; a line without a usable id, and a
  repeated id (the first line with that id is the item, later ones are not run), are reported only.

Output
- `check_output` refuses, before any work, an output that cannot be written (a read-only file or folder, a folder
  in the way, a parent that is a file), that is the input file itself (also through a symlink, a hard link or
  another spelling), or that is not a batch result file (so nothing else is ever appended to or truncated).
- Each result line is written, flushed and fsynced as soon as its item is done; a failing item becomes a line
  with an `error` field and the run goes on. A line's `images` are the item's as the input wrote them (a relative
  path stays relative to the JSONL file, not rewritten for the current folder).
- Re-running with the same output is a resume: ids whose last line is an answer are skipped; a truncated last
  line from an interrupted run is cut off first, so the file stays valid JSONL. Ids whose last line is an error
  are retried (unless `retry_errors=False`, CLI --no-retry-errors): their old lines are dropped by writing the
  rest of the file to a temporary file in the same folder, fsyncing it and os.replace-ing it over the output, so
  a kill at any moment leaves the old file or the new one, whole, with unique ids; the new lines are then
  appended. Lines of ids not in this run's input are never touched.
- `Progress` counts what happened. The CLI's exit status (`batch` in cli.py): 0 = every item of the input has an
  answer; 1 = stopped by an `Error:` line (bad paths or input: before any work; a failed write: mid-run);
  3 = the run finished but some items failed (error lines in the output, written now or kept by
  --no-retry-errors) or some input lines were bad; 130 = interrupted (run the same command to resume). Error lines
  of ids that are not in this run's input neither count nor change.

Generation
- The model runs in worker processes (workers/; `workers` of them, each with its own model and its share of the
  CPU threads): og 0.18 holds the GIL for each whole call, so in one process nothing else runs during a prefill.
- With an output constraint (settings.guidance), a line carries `parsed` (a JSON schema's value); an answer cut
  by the token budget before its structure was complete is an error line (with `partial_answer`), and a
  constraint og cannot compile stops the run with one `Error:` line at the first item (exit 1).
- This process prepares items in a small thread pool (image decoding and the runtime's input pipeline, Pillow and
  numpy, both release the GIL), so preparation really runs beside generation; at most `workers + prefetch` items
  are prepared or generating at once, so memory stays bounded. Lines are written in order of completion by this
  process alone, so `--workers N` never interleaves or duplicates lines, and a kill of this process loses only
  answers not yet written (the workers stop when their pipe closes).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from phi3v_ort.batch import output_lock
from phi3v_ort.errors import Phi3vError
from phi3v_ort.engine.generation import Finished
from phi3v_ort.engine.guidance import GuidanceError, outcome
from phi3v_ort.inputs.images import load_image
from phi3v_ort.inputs.prompt import check_unicode
from phi3v_ort.engine.settings import GenerationSettings

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ITEM_SHAPE = '{"id": ..., "images": [...], "question": ...}'
RESULT_START = b'{"id"'  # every result line starts so (json.dumps of a dict whose first key is "id")


@dataclass(frozen=True)
class Item:
    id: str
    images: tuple[str, ...]  # what to load: a JSONL's relative paths resolved against the JSONL's folder
    question: str
    as_given: tuple[str, ...] | None = None  # the images as the input line wrote them (None: as `images`)

    @property
    def echoed_images(self) -> list[str]:
        """The images as the output line shows them: as the input named them, not rewritten."""
        return list(self.images if self.as_given is None else self.as_given)


@dataclass(frozen=True)
class BadLine:
    """An input line that cannot be run. `id` is set only when the line gets an `error` line in the output."""

    line: int
    problem: str
    id: str | None = None
    images: tuple[str, ...] | None = None
    question: str | None = None

    def row(self) -> dict:
        """The output's `error` line for this item (only for a line with an id)."""
        row: dict = {"id": self.id}
        if self.images is not None:
            row["images"] = list(self.images)
        if self.question is not None:
            row["question"] = self.question
        row["error"] = f"input line {self.line}: {self.problem}"
        return row


@dataclass(frozen=True)
class BatchInput:
    """What a source holds: the items to run, and every bad line (in line order)."""

    source: Path
    items: list[Item]
    bad: list[BadLine] = field(default_factory=list)

    def describe(self, bad: BadLine) -> str:
        """One line for stderr, e.g. `items.jsonl line 4: no question (and no --question was given)`."""
        return f"{self.source} line {bad.line}: {bad.problem}"


def read_batch(source: str | Path, question: str | None = None) -> BatchInput:
    """The items of a JSONL file, or one per image of a folder (sorted by name) with `question`.

    Raises Phi3vError only when the source as a whole cannot be read; bad lines are returned in `.bad`."""
    source = Path(source)
    if question:
        check_unicode(question, "--question")
    if source.is_dir():
        if not question:
            raise Phi3vError("a folder of images needs --question")
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return BatchInput(source, [Item(str(p.relative_to(source)), (str(p),), question) for p in files])
    if not source.exists():
        raise Phi3vError(f"batch input not found: {source}")
    if not source.is_file():
        raise Phi3vError(f"batch input {source} is neither a JSONL file nor a folder of images")
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise Phi3vError(f"cannot read the batch input {source}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise Phi3vError(f"batch input {source} is not UTF-8 text (line {line}, byte {exc.start}); "
                         "save it as UTF-8 JSONL") from None
    base = source.parent
    items: list[Item] = []
    bad: list[BadLine] = []
    first_line: dict[str, int] = {}
    # split on "\n" only: str.splitlines would also break lines at U+2028 and other characters JSON keeps raw
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        parsed = _parse_line(line, question)
        if isinstance(parsed, str):  # no usable id: reported only
            bad.append(BadLine(n, parsed))
            continue
        item_id, images, item_question, problem = parsed
        if item_id in first_line:
            bad.append(BadLine(n, f"repeats the id {item_id!r} of line {first_line[item_id]}; not run"))
            continue
        first_line[item_id] = n
        if problem:
            bad.append(BadLine(n, problem, item_id, images, item_question))
        else:
            items.append(Item(item_id, tuple(_resolve_image(i, base) for i in images), item_question, images))
    return BatchInput(source, items, bad)


def read_items(source: str | Path, question: str | None = None) -> list[Item]:
    """The items of `source` (see read_batch); strict: any bad line raises Phi3vError naming the first one."""
    batch = read_batch(source, question)
    if batch.bad:
        more = f" (and {len(batch.bad) - 1} more bad lines)" if len(batch.bad) > 1 else ""
        raise Phi3vError(f"{batch.describe(batch.bad[0])}{more}")
    return batch.items


def _parse_line(line: str, default_question: str | None):
    """(id, images as written, question, problem or None) for a line with a usable id, else the problem (a
    str)."""
    try:
        row = json.loads(line)
    except ValueError as exc:
        return f"not JSON ({exc}); expected {ITEM_SHAPE}"
    if not isinstance(row, dict):
        return f"not a JSON object; expected {ITEM_SHAPE}"
    if "id" not in row:
        return f"has no id; expected {ITEM_SHAPE}"
    raw_id = row["id"]
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int, float)) or not str(raw_id).strip():
        return f"has no usable id ({json.dumps(raw_id)}): an id is a non-empty string or a number"
    item_id = str(raw_id)
    if _lone_surrogate(item_id):  # it could not be written as the output's UTF-8: reported only
        return f"has no usable id ({json.dumps(raw_id)}): {_lone_surrogate(item_id)}"

    raw_question = row.get("question")
    item_question = None
    problems = []
    if raw_question is not None and not isinstance(raw_question, str):
        problems.append(f"question must be a string, not {_json_type(raw_question)}")
    elif isinstance(raw_question, str) and _lone_surrogate(raw_question):
        problems.append(f"the question {_lone_surrogate(raw_question)}")  # (and it is not written back)
    else:
        item_question = raw_question or default_question
        if not item_question:
            problems.append("no question (and no --question was given)")

    raw_images = row.get("images", [])
    images = None
    if isinstance(raw_images, str):
        raw_images = [raw_images]
    if not isinstance(raw_images, list):
        problems.append(f"images must be a path/URL or a list of them, not {_json_type(raw_images)}")
    elif not all(isinstance(i, str) and i.strip() for i in raw_images):
        problems.append("images must be a list of non-empty path/URL strings")
    elif any(_lone_surrogate(i) for i in raw_images):
        problems.append(f"an image path {next(_lone_surrogate(i) for i in raw_images if _lone_surrogate(i))}")
    else:
        images = tuple(raw_images)
    return item_id, images, item_question, "; ".join(problems) or None


def _lone_surrogate(text: str) -> str | None:
    """What is wrong with a string that holds a lone surrogate (JSON's `\\ud800`: half of an emoji), else None.
    Such a string cannot be tokenized or written as UTF-8, so its item becomes an error line."""
    try:
        check_unicode(text)
    except Phi3vError as exc:
        return str(exc).removeprefix("the text ")
    return None


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", bool: "true/false", type(None): "null",
            str: "a string", int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _resolve_image(src: str, base: Path) -> str:
    """A JSONL's relative image path is relative to the JSONL's folder; URLs and absolute paths stay as they are."""
    if src.startswith(("http://", "https://")) or Path(src).expanduser().is_absolute():
        return src
    return str(base / src)


# --- the output file -------------------------------------------------------------------------------------------


@dataclass
class OutputState:
    """An existing output, read without changing it."""

    lines: list[tuple[str, bool, bytes]] = field(default_factory=list)  # (id, is_error, the line with its \n)
    partial: bool = False  # a truncated last line (an interrupted write) follows the complete lines
    complete_bytes: int = 0

    def last_is_error(self) -> dict[str, bool]:
        """For each id, whether its last line is an error."""
        return {item_id: is_error for item_id, is_error, _ in self.lines}


def scan_output(output: str | Path) -> OutputState:
    """Read an existing output (an absent one is empty); Phi3vError if it is not a batch result file."""
    output = Path(output)
    if not output.exists():
        return OutputState()
    try:
        data = output.read_bytes()
    except OSError as exc:
        raise Phi3vError(f"cannot read the output {output}: {exc.strerror or exc}") from None
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    refuse = f"{output} is not a phi3v-ort batch result file (%s); choose another -o"
    if tail and not (tail.startswith(RESULT_START) or RESULT_START.startswith(tail) or not tail.strip(b"\0")):
        raise Phi3vError(refuse % "its last line is not a result")
    state = OutputState(partial=bool(tail), complete_bytes=cut)
    for n, line in enumerate(data[:cut].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            ok = isinstance(row, dict) and "id" in row and ("answer" in row or "error" in row)
        except ValueError:
            ok = False
        if not ok:
            raise Phi3vError(refuse % f"line {n} is not a result")
        state.lines.append((str(row["id"]), "answer" not in row, line + b"\n"))
    return state


def check_output(output: str | Path, source: str | Path | None = None, ids: Iterable[str] | None = None,
                 retry_errors: bool = True) -> OutputState:
    """Refuse, before any work, an output that cannot be written, is the input, or is not a result file.

    `ids` (this run's item ids) tells whether earlier errors will be retried, which needs to write in the output's
    folder. Nothing is changed on disk. Returns what the output holds."""
    output = Path(output)
    if output.is_dir():
        raise Phi3vError(f"the output {output} is a folder; -o needs a file")
    if output.exists():
        if not output.is_file():
            raise Phi3vError(f"the output {output} is not a regular file")
        if source is not None and Path(source).exists() and os.path.samefile(source, output):
            raise Phi3vError(f"the output {output} is the input file itself; choose another -o")
        if not os.access(output, os.R_OK | os.W_OK):
            raise Phi3vError(f"cannot write the output {output}: it is read-only (permission denied)")
        state = scan_output(output)
        if retry_errors and ids is not None:
            failed = {i for i, is_error in state.last_is_error().items() if is_error}
            folder = Path(os.path.realpath(output)).parent
            if failed.intersection(ids) and not os.access(folder, os.W_OK | os.X_OK):
                raise Phi3vError(f"cannot retry the failed items: the output's folder {folder} is read-only "
                                 "(use --no-retry-errors to keep their error lines)")
        return state
    if output.is_symlink():
        raise Phi3vError(f"the output {output} is a symlink to nothing")
    folder = output.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise Phi3vError(f"cannot create the output {output}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise Phi3vError(f"cannot create the output {output}: the folder {folder} is read-only (permission denied)")
    return OutputState()


def rewrite_output(output: Path, lines: Iterable[bytes]) -> None:
    """Replace the output's content crash-safely: a temp file in the same folder, fsync, os.replace, fsync folder."""
    real = Path(os.path.realpath(output))  # a symlinked output stays a symlink
    fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
    try:
        lock = output_lock.held(output)
        if lock is not None:  # the copy is locked before it takes the output's name
            lock.adopt(fd)
        with os.fdopen(fd, "wb") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(real.stat().st_mode))
        os.replace(tmp, real)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_folder(real.parent)


def fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_line(out, row: dict) -> None:
    """One result line, durable before the next item starts."""
    text = json.dumps(row, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate that slipped through: JSON's \\ud800 escape keeps it readable
        text = json.dumps(row)
    out.write(text + "\n")
    out.flush()
    os.fsync(out.fileno())


@dataclass
class Progress:
    done: int = 0  # answered in this run
    failed: int = 0  # error lines written in this run (bad input lines with an id included)
    skipped: int = 0  # already answered in the output
    retried: int = 0  # earlier error lines dropped to run their items again
    kept_failed: int = 0  # earlier error lines kept (retry_errors=False)
    todo: int = 0  # lines this run writes
    tokens: int = 0
    started: float = 0.0
    unanswered: int = 0  # items this run wrote no line for (--ray: blocks Ray gave up on); the next run does them


def _prepare(pipeline, item: Item) -> list:
    """An item's images, decoded and prepared for the model (runs in a preparation thread)."""
    return [pipeline.prepare_image(load_image(src)) for src in item.images]


@dataclass
class Plan:
    """What a run does with an output it resumes (the same rules for the local batch and --ray)."""

    state: OutputState
    todo: list[Item]  # items to answer
    todo_bad: list[BadLine]  # bad input lines with an id, to write as error lines
    retry: set[str]  # ids whose earlier error lines are dropped before the run
    progress: Progress


def item_ids(items: Sequence[Item], bad: Sequence[BadLine]) -> list[str]:
    ids = [it.id for it in items] + [b.id for b in bad if b.id is not None]
    if len(set(ids)) != len(ids):
        repeated = next(i for i in ids if ids.count(i) > 1)
        raise Phi3vError(f"the batch items repeat the id {repeated!r}")
    return ids


def plan_run(items: Sequence[Item], state: OutputState, bad: Sequence[BadLine] = (),
             retry_errors: bool = True) -> Plan:
    """The resume rules: ids whose last line is an answer are skipped; ids whose last line is an error run again
    (unless `retry_errors` is False); every other id runs. `state`: what the output holds (check_output)."""
    with_id = [b for b in bad if b.id is not None]
    wanted = set(item_ids(items, bad))
    last = state.last_is_error()
    failed_before = {i for i in wanted if last.get(i) is True}
    retry = failed_before if retry_errors else set()

    def runs(item_id: str) -> bool:
        return item_id not in last or item_id in retry

    todo = [it for it in items if runs(it.id)]
    todo_bad = [b for b in with_id if runs(b.id)]
    progress = Progress(skipped=sum(1 for i in wanted if last.get(i) is False), retried=len(retry),
                        kept_failed=len(failed_before) - len(retry), todo=len(todo) + len(todo_bad),
                        started=time.perf_counter())
    return Plan(state, todo, todo_bad, retry, progress)


def open_output(output: Path, plan: Plan):
    """The output opened for appending, after dropping the retried ids' old lines (crash-safely) or cutting off a
    truncated last line."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if plan.retry:
            rewrite_output(output, (line for i, _, line in plan.state.lines if i not in plan.retry))
        elif plan.state.partial:
            with output.open("r+b") as f:
                f.truncate(plan.state.complete_bytes)
                os.fsync(f.fileno())
        return output.open("a", encoding="utf-8")
    except OSError as exc:
        raise Phi3vError(f"cannot write the output {output}: {exc.strerror or exc}") from None


def run_batch(pool, pipeline, items: list[Item], output: Path, settings: GenerationSettings,
              prepare_threads: int = 2, prefetch: int = 4, on_progress=None, *, bad: Sequence[BadLine] = (),
              retry_errors: bool = True) -> Progress:
    """Answer every item not yet answered in `output` with the started workers.pool.WorkerPool `pool`, appending one
    JSON line per item; `pipeline` (inputs.make_pipeline) prepares the images here.

    `bad` input lines with an id get an `error` line; ids whose last line is an error are run again (their old
    lines dropped first) unless `retry_errors` is False."""
    output = Path(output)
    with output_lock.output_lock(output):  # one run per output (the CLI holds it already: re-entrant)
        return _run_locked(pool, pipeline, items, output, settings, prepare_threads, prefetch, on_progress, bad,
                           retry_errors)


def _run_locked(pool, pipeline, items: list[Item], output: Path, settings: GenerationSettings,
                prepare_threads: int, prefetch: int, on_progress, bad: Sequence[BadLine],
                retry_errors: bool) -> Progress:
    plan = plan_run(items, check_output(output, ids=item_ids(items, bad), retry_errors=retry_errors), bad,
                    retry_errors)
    todo, todo_bad, progress = plan.todo, plan.todo_bad, plan.progress
    out = open_output(output, plan)
    generators = len(pool.workers)
    with out, ThreadPoolExecutor(max(1, prepare_threads), thread_name_prefix="prepare") as preparing, \
            ThreadPoolExecutor(generators, thread_name_prefix="generate") as generating:
        try:
            for b in todo_bad:
                _write_line(out, b.row())
                progress.failed += 1
                if on_progress:
                    on_progress(progress)
        except OSError as exc:
            raise Phi3vError(f"cannot write the output {output}: {exc.strerror or exc}") from None
        queue = iter(todo)
        running: dict[Future, Item] = {}

        def refill() -> None:
            while len(running) < generators + max(0, prefetch):
                item = next(queue, None)
                if item is None:
                    return
                prepared = preparing.submit(_prepare, pipeline, item)
                running[generating.submit(_answer, pool, pipeline, item, prepared, settings)] = item

        refill()
        try:
            while running:
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    running.pop(future)
                    row = future.result()
                    if "error" in row:
                        progress.failed += 1
                    else:
                        progress.done += 1
                        progress.tokens += row["stats"]["generated_tokens"]
                    try:
                        _write_line(out, row)
                    except OSError as exc:
                        raise Phi3vError(f"cannot write the output {output}: {exc.strerror or exc}") from None
                    if on_progress:
                        on_progress(progress)
                refill()
        except BaseException:  # Ctrl-C or a failed write: stop the workers so no thread waits for them
            for future in running:
                future.cancel()
            pool.close(timeout=1)
            raise
    return progress


def _answer(pool, pipeline, item: Item, prepared: Future, settings: GenerationSettings) -> dict:
    """One item on the first idle worker (in a generation thread): its result line, or its error line."""
    from phi3v_ort.workers.pool import Job, run_job
    from phi3v_ort.workers.protocol import batch_error

    base = {"id": item.id, "images": item.echoed_images, "question": item.question}
    try:
        images = prepared.result()
        worker = pool.acquire()
        events, error, _ = run_job(worker, Job(request_id=f"batch-{item.id}", question=item.question,
                                               images=images, settings=settings, processor=pipeline.name,
                                               crops=pipeline.crops, keep=False))
        if error:
            return {**base, "error": batch_error(error)}  # a constraint og cannot compile stops the run
        finished = next(e for e in events if isinstance(e, Finished))
    except GuidanceError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bad item never stops the run; Ctrl-C (not an Exception) does
        return {**base, "error": error_message(exc)}
    return finished_row(base, finished, settings)


def error_message(exc: Exception) -> str:
    """An item's `error` text for an exception."""
    return str(exc) if isinstance(exc, Phi3vError) else f"{type(exc).__name__}: {str(exc).strip()}"


def finished_row(base: dict, finished: Finished, settings: GenerationSettings) -> dict:
    """An answered item's result line (`base`: its id, images and question), or its error line when the answer
    was cut before its output constraint was complete."""
    result = outcome(settings.guidance, finished.text, finished.stats.finish_reason, finished.stats.generated_tokens)
    if not result.complete:  # an error line (retried by the next run, e.g. with a larger --max-new-tokens)
        return {**base, "error": result.problem, "partial_answer": finished.text, "stats": finished.stats.to_dict()}
    return {**base, "answer": finished.text, **({"parsed": result.parsed} if result.has_parsed else {}),
            "token_ids": list(finished.token_ids), "stats": finished.stats.to_dict()}
