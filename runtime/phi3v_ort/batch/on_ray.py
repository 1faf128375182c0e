"""Batch runs on a Ray cluster (`phi3v-ort batch --ray`): Ray Data fans the items out to model actors.

Imported only with --ray (it needs the `ray` extra: ray[data], which brings pyarrow); nothing else in the package
imports it, so a local run never loads Ray.

- `Answerer` is the callable class for `Dataset.map_batches(Answerer, batch_format="pyarrow", ...)`: each actor
  loads one model (on the CPU, or on the GPU Ray gave it with num_gpus) and answers a block of rows
  (`id`, `images` as paths / http(s) URLs / bytes, `question`, optional per-row `max_new_tokens` and `crops`) the
  way a local batch worker does (the same Conversation, the same result lines: batch.finished_row), so greedy
  answers are identical. A bad row becomes a row with `error`; nothing a row holds raises out of the actor.
  Generation runs in the actor's own process (the actor IS the worker process of the local batch).
- `run_ray_batch` is the driver: the local batch's input (read_batch), its resume rules (check_output, plan_run:
  answered ids are filtered out before the job starts, failed ones retried), a job of `from_items -> map_batches`
  on a fixed pool of actors, and the output written HERE, one block at a time as blocks complete: appended to the
  same single JSONL file the local batch writes (flushed and fsynced per block: a crash loses at most the blocks in
  flight, and the next run, local or --ray, resumes the same file), or, for an output ending in .parquet, a folder
  of Parquet files, one per block, each written to a temporary name and renamed (never half-written).
  Ray's own writers (write_json/write_parquet) were not used: they write one file per block under names of their
  own (min_rows_per_file only sets a minimum), never append to an existing file, and can leave a half-written file
  on a crash, so neither one-file output nor resume across the local batch and --ray would hold. The driver only
  sees the answers (text, token ids, stats: about 1 KB a row), never images.

Sizing, from what was measured with ray 2.60 (issue 16): a block's results reach the driver only when the whole
block is done, so blocks are small (1 to 16 rows, at least 8 blocks per actor); `concurrency=` is deprecated
(its tuple form started one actor only), so the pool is `compute=ActorPoolStrategy(size=N)`, a fixed size; actors
get a fractional CPU reservation by default (two 1-CPU actors on a 2-CPU node left Ray Data's read task without a
CPU and the job hung), leaving at least one CPU of the cluster to Ray Data's own tasks. A row whose actor dies
(a native crash) is retried on a restarted actor a few times; after that its block is left out of this run
(`Progress.unanswered`) and the next run tries it again. A model that does not load stops the job with one
sentence.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from phi3v_ort.batch.runner import (BatchInput, Item, OutputState, Plan, Progress, fsync_folder, item_ids, check_output, error_message,
                    finished_row, open_output, plan_run)
from phi3v_ort.errors import Phi3vError
from phi3v_ort.engine.generation import Finished, GenerationStats
from phi3v_ort.engine.settings import GenerationSettings

MAX_ROWS_PER_BLOCK = 16
TASK_RETRIES = 3  # a block whose actor died (native crash, OOM kill) runs again at most this often


# --- the row format in Arrow: the local batch's result lines, one fixed schema ---------------------------------------

_ARROW_TYPES = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "str": pa.string(),
                "str | None": pa.string(), "float | None": pa.float64(), "int | None": pa.int64(),
                "tuple[int, ...]": pa.list_(pa.int64())}
STATS = pa.struct([(f.name, _ARROW_TYPES[f.type]) for f in fields(GenerationStats)])
# every block has this schema, so blocks and Parquet files always agree (an all-error block included).
# `parsed` (a JSON schema's value, any JSON) is its JSON text here; the JSONL line holds the value itself.
SCHEMA = pa.schema([("id", pa.string()), ("images", pa.list_(pa.string())), ("question", pa.string()),
                    ("answer", pa.string()), ("parsed", pa.string()), ("token_ids", pa.list_(pa.int64())),
                    ("stats", STATS), ("error", pa.string()), ("partial_answer", pa.string())])


def to_table(lines: list[dict]) -> pa.Table:
    """Result lines (the local batch's dicts) -> an Arrow table with SCHEMA."""
    records = [{**line, "parsed": json.dumps(line["parsed"], ensure_ascii=False)} if "parsed" in line else line
               for line in lines]
    return pa.Table.from_pylist(records, schema=SCHEMA)


def to_line(record: dict) -> dict:
    """An Arrow row -> the local batch's result line, with its keys in the same order (`id` first)."""
    line = {"id": record["id"]}
    if record.get("images") is not None:
        line["images"] = record["images"]
    if record.get("question") is not None:
        line["question"] = record["question"]
    if record.get("error") is None:
        line["answer"] = record["answer"]
        if record.get("parsed") is not None:
            line["parsed"] = json.loads(record["parsed"])
        line["token_ids"] = record["token_ids"]
        line["stats"] = record["stats"]
        return line
    line["error"] = record["error"]
    if record.get("partial_answer") is not None:
        line["partial_answer"] = record["partial_answer"]
    if record.get("stats") is not None:
        line["stats"] = record["stats"]
    return line


# --- the actor -----------------------------------------------------------------------------------------------------


class Answerer:
    """One model per actor; `__call__` answers a block of rows (pyarrow in, pyarrow out: SCHEMA).

    `model_dir` (a package folder every node can read) or `model` (a catalog name: each node finds it in its hub
    cache, or fetches it there on first use). `device`: "cpu", or "cuda" in an actor with num_gpus (Ray sets
    CUDA_VISIBLE_DEVICES to its GPU). `threads`: og's intra-op threads per session on the CPU."""

    def __init__(self, model_dir: str | None = None, model: str | None = None, device: str = "cpu",
                 settings: GenerationSettings = GenerationSettings(), processor: str = "own", crops: int | None = None,
                 threads: int | None = None):
        from phi3v_ort.package.fetch import resolve_model_dir
        from phi3v_ort.inputs.pipeline import make_pipeline
        from phi3v_ort.engine.kv_cache import KVCachePolicy
        from phi3v_ort.engine.model import load_model

        try:
            self.model = load_model(resolve_model_dir(model, model_dir, device), device, KVCachePolicy(), threads)
            make_pipeline(self.model.builder, processor, crops)  # a bad --crops stops the job, not each row
        except Phi3vError as exc:
            raise Phi3vError(f"the model actor on {socket.gethostname()} could not start: {exc}") from None
        self.settings, self.processor, self.crops = settings, processor, crops

    def __call__(self, batch: pa.Table) -> pa.Table:
        return to_table([self.answer(row) for row in batch.to_pylist()])

    def answer(self, row: dict) -> dict:
        """One row's result line (the local batch's), or its error line."""
        from phi3v_ort.engine.conversation import Conversation
        from phi3v_ort.engine.kv_cache import job_reserve

        sources = row.get("images")
        sources = [] if sources is None else [sources] if isinstance(sources, (str, bytes)) else list(sources)
        labels = [s if isinstance(s, str) else f"<{len(s)} bytes>" if isinstance(s, bytes) else repr(s)
                  for s in sources]
        base = {"id": str(row.get("id")), "images": labels, "question": row.get("question")}
        try:
            if not isinstance(row.get("question"), str) or not row["question"]:
                raise Phi3vError("no question")
            settings = self.settings
            if row.get("max_new_tokens") is not None:
                settings = replace(settings, max_new_tokens=int(row["max_new_tokens"]))
            crops = self.crops if row.get("crops") is None else int(row["crops"])
            # as a local batch worker runs a job (workers/process.py): a fresh conversation, its budget, no history
            conv = Conversation(self.model, settings, None, reserve_tokens=job_reserve(settings.max_new_tokens),
                                processor=self.processor, crops=crops, drop_old_turns=False)
            images = [conv.prepare_image(_load(src, label)) for src, label in zip(sources, labels)]
            finished = None
            for event in conv.ask(row["question"], images):
                if isinstance(event, Finished):
                    finished = event
            conv.reset()  # frees the KV cache now
        except Exception as exc:  # noqa: BLE001 - a bad row is an error row, never the end of the job
            return {**base, "error": error_message(exc)}
        return finished_row(base, finished, settings)


def _load(source, label: str):
    """A path or http(s) URL (images.load_image), or the image's bytes."""
    from phi3v_ort.inputs.images import MAX_BYTES, ImageInput, decode, load_image

    if isinstance(source, str):
        return load_image(source)
    if not isinstance(source, bytes):
        raise Phi3vError(f"an image must be a path, an http(s) URL or bytes, not {type(source).__name__}")
    if not source:
        raise Phi3vError(f"image {label} is empty")
    if len(source) > MAX_BYTES:
        raise Phi3vError(f"image {label} is larger than the {MAX_BYTES // (1024 * 1024)} MB limit")
    started = time.perf_counter()
    image, pass_through = decode(source, label)
    return ImageInput(label, source, image, pass_through, time.perf_counter() - started)


# --- the output: the local batch's JSONL file, or a folder of Parquet files ----------------------------------------


def is_parquet(output: str | Path) -> bool:
    return str(output).lower().rstrip("/").endswith(".parquet")


def check(output: str | Path, source: str | Path | None, ids: list[str], retry_errors: bool = True) -> OutputState:
    """Refuse, before any work, an output that cannot be written (check_output for JSONL); what it holds."""
    if not is_parquet(output):
        return check_output(output, source, ids, retry_errors)
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise Phi3vError(f"the output {folder} is a file: a .parquet output is a folder of Parquet files")
    probe = folder if folder.is_dir() else folder.absolute().parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise Phi3vError(f"cannot write the output {folder}: {probe} is not a writable folder")
    return scan_parquet(folder)


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


def scan_parquet(folder: Path) -> OutputState:
    """The (id, is_error) of every row of a Parquet output folder, in the order written (part names sort so)."""
    state = OutputState()
    if not folder.is_dir():
        return state
    others = [p.name for p in folder.iterdir() if not p.name.startswith(("part-", ".part-"))]
    if others:
        raise Phi3vError(f"{folder} is not a phi3v-ort batch result folder (it holds {others[0]}); choose another -o")
    for part in _parts(folder):
        try:
            table = pq.read_table(part, columns=["id", "error"])
        except (OSError, pa.ArrowException) as exc:
            raise Phi3vError(f"{part} is not a readable batch result file ({exc}); choose another -o") from None
        for item_id, error in zip(table.column("id").to_pylist(), table.column("error").to_pylist()):
            state.lines.append((str(item_id), error is not None, b""))
    return state


class JsonlSink:
    """Appends to the local batch's output file; durable after each block."""

    def __init__(self, output: Path, plan: Plan):
        self.output = output
        self.out = open_output(output, plan)

    def write(self, lines: list[dict]) -> None:
        try:
            self.out.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
            self.out.flush()
            os.fsync(self.out.fileno())
        except OSError as exc:
            raise Phi3vError(f"cannot write the output {self.output}: {exc.strerror or exc}") from None

    def close(self) -> None:
        self.out.close()


class ParquetSink:
    """One Parquet file per block in the output folder: written to a hidden temporary name, fsynced, renamed."""

    def __init__(self, folder: Path, plan: Plan):
        self.folder, self.run, self.count = folder, time.time_ns(), 0
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for tmp in folder.glob(".part-*.tmp"):  # left by a run killed mid-write
                tmp.unlink()
            if plan.retry:  # the retried ids' old error rows go, part by part (each part replaced whole)
                for part in _parts(folder):
                    table = pq.read_table(part)
                    keep = [i not in plan.retry for i in table.column("id").to_pylist()]
                    if not any(keep):
                        part.unlink()
                    elif not all(keep):
                        self._replace(part, table.filter(pa.array(keep)))
                fsync_folder(folder)
        except OSError as exc:
            raise Phi3vError(f"cannot write the output {folder}: {exc.strerror or exc}") from None

    def _replace(self, part: Path, table: pa.Table) -> None:
        tmp = self.folder / f".{part.name}.tmp"
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, part)

    def write(self, lines: list[dict]) -> None:
        self.count += 1
        try:
            self._replace(self.folder / f"part-{self.run}-{self.count:06d}.parquet", to_table(lines))
            fsync_folder(self.folder)
        except OSError as exc:
            raise Phi3vError(f"cannot write the output {self.folder}: {exc.strerror or exc}") from None

    def close(self) -> None:
        pass


# --- the driver ----------------------------------------------------------------------------------------------------


def _resolve_local(src: str) -> str:
    """An image path as every node reads it: absolute (Ray's workers do not run in this folder)."""
    if src.startswith(("http://", "https://")):
        return src
    return os.path.abspath(os.path.expanduser(src))


def rows_per_block(todo: int, actors: int) -> int:
    """Small blocks: a block's answers reach the output only when the whole block is done, and every actor should
    have blocks to take (at least 8 blocks per actor), but not a million of them (from_items costs ~1 ms a block)."""
    return max(1, min(MAX_ROWS_PER_BLOCK, todo // max(1, 8 * actors)))


def run_ray_batch(data: BatchInput, output: str | Path, settings: GenerationSettings, *, model: str | None = None,
                  model_dir: str | None = None, device: str = "auto", address: str | None = None,
                  actors: int | None = None, gpus_per_actor: float | None = None,
                  cpus_per_actor: float | None = None, threads: int | None = None, processor: str = "own",
                  crops: int | None = None, retry_errors: bool = True, block_rows: int | None = None,
                  on_start=None, on_block=None) -> Progress:
    """Answer `data`'s items not yet answered in `output` on a Ray cluster (see the module's docstring).

    Connects to `address` (else RAY_ADDRESS, else starts a local instance), unless Ray is already initialized in
    this process; shuts down only what it started. Defaults: one GPU per actor when the cluster has GPUs (and
    `device` is not cpu), as many actors as GPUs (1 on a CPU cluster), a fractional CPU reservation per actor that
    leaves one CPU of the cluster free. `on_start(info)` gets the job's shape, `on_block(progress)` each block."""
    from phi3v_ort.package.fetch import model_target

    output = Path(output)
    sink_type = ParquetSink if is_parquet(output) else JsonlSink
    plan = plan_run(data.items, check(output, data.source, item_ids(data.items, data.bad), retry_errors), data.bad,
                    retry_errors)
    progress = plan.progress
    if device not in ("auto", "cpu", "cuda"):
        raise Phi3vError(f"unknown device {device!r}: choose auto, cuda or cpu")
    if gpus_per_actor is not None and gpus_per_actor < 0 or cpus_per_actor is not None and cpus_per_actor <= 0:
        raise Phi3vError("--gpus-per-actor must be 0 or more and --cpus-per-actor above 0")
    if actors is not None and actors < 1:
        raise Phi3vError(f"--actors must be at least 1, got {actors}")
    if device == "cpu" and gpus_per_actor:
        raise Phi3vError("--device cpu with --gpus-per-actor: choose one (cpu actors take no GPU)")
    # the model as every node finds it: a folder by its absolute path, or a catalog name each actor resolves for its
    # own device (checked here without asking for a GPU: the driver's node may have none)
    target = model_target(model, model_dir, "cpu")
    where = ({"model_dir": str(target.absolute())} if isinstance(target, Path)
             else {"model": model or os.environ.get("PHI3V_ORT_MODEL") or None})

    sink = sink_type(output, plan)
    try:
        if plan.todo_bad:
            sink.write([b.row() for b in plan.todo_bad])
            progress.failed += len(plan.todo_bad)
        if plan.todo:
            _run_job(plan.todo, sink, progress, settings, where, device=device, address=address, actors=actors,
                     gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, threads=threads,
                     processor=processor, crops=crops, block_rows=block_rows, on_start=on_start, on_block=on_block)
    finally:
        sink.close()
    return progress


def _run_job(todo: list[Item], sink, progress: Progress, settings: GenerationSettings, where: dict, *, device: str,
             address, actors, gpus_per_actor, cpus_per_actor, threads, processor, crops, block_rows, on_start,
             on_block) -> None:
    import ray
    import ray.data

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address)
    try:
        resources = ray.cluster_resources()
        cluster_cpus, cluster_gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        if gpus_per_actor is None:
            gpus_per_actor = 1.0 if cluster_gpus and device != "cpu" else 0.0
        if device == "cuda" and not gpus_per_actor:
            raise Phi3vError("--device cuda needs GPUs for the actors: the cluster has none (or --gpus-per-actor 0)")
        if gpus_per_actor > cluster_gpus:
            raise Phi3vError(f"--gpus-per-actor {gpus_per_actor:g}, but the cluster has {cluster_gpus:g} GPUs")
        if actors is None:
            actors = max(1, int(cluster_gpus // gpus_per_actor)) if gpus_per_actor else 1
        if cpus_per_actor is None:  # fractional: leaves one CPU to Ray Data's own tasks (else the job can hang)
            cpus_per_actor = max(0.01, math.floor(min(1.0, (cluster_cpus - 1) / actors) * 100) / 100)
        actor_device = "cuda" if gpus_per_actor else "cpu"
        if threads is None and actor_device == "cpu":
            threads = max(1, int(cpus_per_actor))
        rows = block_rows or rows_per_block(len(todo), actors)
        blocks = math.ceil(len(todo) / rows)
        if on_start:
            on_start({"actors": actors, "gpus_per_actor": gpus_per_actor, "cpus_per_actor": cpus_per_actor,
                      "device": actor_device, "threads": threads, "items": len(todo), "blocks": blocks,
                      "cluster_cpus": cluster_cpus, "cluster_gpus": cluster_gpus})

        originals = {it.id: it.echoed_images for it in todo}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray.data.context")
            ds = ray.data.from_items([{"id": it.id, "images": [_resolve_local(s) for s in it.images],
                                       "question": it.question} for it in todo], override_num_blocks=blocks)
            ds.context.max_errored_blocks = -1  # a block whose actor keeps dying is left out, not the job
            # ray 2.60 deprecates extra remote args (removal in 2.64, hence the extra's pin) and has no other way
            # to bound the retries: its default retries a block whose actor died forever (a poison item would loop)
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            ds = ds.map_batches(
                Answerer, batch_size=None, batch_format="pyarrow",
                fn_constructor_kwargs={**where, "device": actor_device, "settings": settings, "processor": processor,
                                       "crops": crops, "threads": threads},
                compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
                num_gpus=gpus_per_actor or None, max_task_retries=TASK_RETRIES)
        written: set[str] = set()
        try:
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                lines = []
                for record in block.to_pylist():
                    line = to_line(record)
                    if line["id"] in written or line["id"] not in originals:
                        continue  # never twice (a retried block can only come back whole, but be sure)
                    line["images"] = originals[line["id"]]  # as the input named them (the local batch's lines)
                    written.add(line["id"])
                    lines.append(line)
                    if "error" in line:
                        progress.failed += 1
                    else:
                        progress.done += 1
                        progress.tokens += line["stats"]["generated_tokens"]
                if lines:
                    sink.write(lines)
                if on_block:
                    on_block(progress)
        except ray.exceptions.RayError as exc:
            raise Phi3vError(_ray_sentence(exc)) from None
        progress.unanswered = len(todo) - len(written)
    finally:
        if started_here:
            ray.shutdown()


def _ray_sentence(exc: BaseException) -> str:
    """Ray's error (an actor that could not start, e.g. the model did not load) -> its cause, in one line."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", getattr(exc, "error_msg", None) or str(exc))
    last = [line.strip() for line in text.splitlines() if line.strip() and not set(line.strip()) <= {"^", "~"}]
    cause = last[-1] if last else type(exc).__name__
    cause = re.sub(r"^(phi3v_ort\.errors\.)?Phi3vError: ", "", cause)
    return f"the Ray job failed: {cause}"
