"""The worker memory limit (workers/memory_limit.py): parsed from --worker-memory-limit, a default from the
machine's memory, applied inside the worker process; a runaway allocation there fails one request and the
restarted worker answers the next."""

import json
import time

import pytest

from phi3v_ort.workers.pool import start_workers
from phi3v_ort.engine.guidance import Guidance
from phi3v_ort.engine.settings import GenerationSettings
from phi3v_ort.errors import Phi3vError
from phi3v_ort.workers import memory_limit as M
from phi3v_ort.workers.pool import Job, Worker, WorkerSpec, run_job
from phi3v_ort.workers.protocol import ErrorKind

GiB = 2**30


def _address_space_limit(pid: int) -> int | None:
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max address space"):
            soft = line.split()[3]
            return None if soft == "unlimited" else int(soft)
    raise AssertionError("no address-space line")


@pytest.mark.parametrize("text,size", [("8G", 8 * GiB), ("8GiB", 8 * GiB), ("6000M", 6000 * 2**20),
                                       ("512m", 512 * 2**20), ("1.5g", int(1.5 * GiB)), (str(2 * GiB), 2 * GiB),
                                       ("none", None), ("0", None), ("unlimited", None)])
def test_sizes_are_read_in_the_usual_units(text, size):
    assert M.parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "8X", "-1G", "", "10", "100M"])
def test_a_bad_or_tiny_size_is_one_sentence(text):
    with pytest.raises(Phi3vError, match="--worker-memory-limit"):
        M.parse_size(text)


def test_the_default_follows_the_machine():
    total = M.physical_memory()
    assert total and M.default_limit("cpu") == max(total * 3 // 4, M.MIN_DEFAULT)
    assert M.default_limit("cuda") is None  # the CUDA driver reserves address space beyond memory


@pytest.mark.parametrize("option,expected", [(None, "default"), ("3G", 3 * GiB), ("none", None)])
def test_serve_and_batch_workers_get_the_limit(tiny_dir, option, expected):
    expected = M.default_limit("cpu") if expected == "default" else expected
    pool = start_workers(None, str(tiny_dir), "cpu", 1, 1, worker_memory_limit=option).pool
    try:
        worker = pool.workers[0]
        assert worker.spec.memory_limit == expected
        assert _address_space_limit(worker.info["pid"]) == expected
    finally:
        pool.close()


def _unchecked(kind: str, data: str) -> Guidance:
    """A constraint past the limits that guidance.py refuses: what a bug there would let through."""
    constraint = object.__new__(Guidance)
    for name, value in (("kind", kind), ("data", data), ("label", "response_format")):
        object.__setattr__(constraint, name, value)
    return constraint


def test_a_runaway_compile_fails_one_request_and_the_next_is_answered(tiny_dir):
    worker = Worker(0, WorkerSpec(str(tiny_dir), "cpu", threads=1, memory_limit=2 * GiB))
    worker.start()
    try:
        # without the limit this schema had a worker allocate 22 GB: check that the limit is on before trying it
        assert _address_space_limit(worker.info["pid"]) == 2 * GiB
        runaway = _unchecked("json_schema", json.dumps({"type": "array", "items": {"type": "integer"},
                                                        "minItems": 1_000_000_000}))
        _, error, _ = run_job(worker, Job("r1", "hi", [], GenerationSettings(max_new_tokens=3, guidance=runaway)))
        assert error is not None and error.kind is ErrorKind.WORKER_DIED, error  # Rust aborts on a failed allocation
        deadline = time.monotonic() + 60
        while not worker.alive and time.monotonic() < deadline:
            time.sleep(0.1)
        events, error, summary = run_job(worker, Job("r2", "hi", [], GenerationSettings(max_new_tokens=3)))
        assert error is None and summary.generated == 3
    finally:
        worker.close()
