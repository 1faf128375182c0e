"""`phi3v-ort batch` against hostile inputs: a FIFO, a device or a folder as an image (an error line, never a
hang), lone surrogates in a JSONL line (an error line for that item, later items answered, re-runs fine), and two
runs on the same -o (the second is refused in one line naming the holder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from phi3v_ort.batch import output_lock
from phi3v_ort.batch.runner import rewrite_output, read_batch
from phi3v_ort.cli import cli
from phi3v_ort.errors import Phi3vError


def batch(tiny_dir, *args, timeout: float = 120):
    """The CLI in a thread with a deadline: a hang is a failure, not a stuck test run."""
    result = []
    thread = threading.Thread(target=lambda: result.append(CliRunner().invoke(
        cli, ["batch", *map(str, args), "--model-dir", str(tiny_dir), "--max-new-tokens", "3"])), daemon=True)
    thread.start()
    thread.join(timeout)
    assert result, f"batch did not finish within {timeout} s"
    return result[0]


def rows(path: Path) -> dict:
    return {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    return path


def test_special_files_as_images_are_error_lines_and_the_rest_is_answered(tiny_dir, png, tmp_path, fifo):
    good = png(64, 48, name="good.png")
    (tmp_path / "folder.png").mkdir()
    link = tmp_path / "link.png"
    link.symlink_to(fifo)
    items = [("fifo", str(fifo), "named pipe"), ("link", str(link), "named pipe"),
             ("device", "/dev/zero", "character device"), ("folder", str(tmp_path / "folder.png"), "directory")]
    src = tmp_path / "items.jsonl"
    src.write_text("".join(json.dumps({"id": i, "images": [p], "question": "What?"}) + "\n" for i, p, _ in items)
                   + json.dumps({"id": "good", "images": [str(good)], "question": "What?"}) + "\n")
    out = tmp_path / "out.jsonl"
    result = batch(tiny_dir, src, "-o", out)
    assert result.exit_code == 3, result.stderr
    got = rows(out)
    assert "answer" in got["good"]
    for item_id, _, words in items:
        assert f"is a {words}" in got[item_id]["error"] and "not an image file" in got[item_id]["error"]


def test_a_folder_of_images_skips_special_files(tiny_dir, png, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")
    png(64, 48, name="pics/a.png")
    out = tmp_path / "out.jsonl"
    result = batch(tiny_dir, folder, "--question", "What?", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert list(rows(out)) == ["a.png"]


SURROGATE_LINES = [
    '{"id": "q", "images": [], "question": "caf\\udce9"}',
    '{"id": "emoji-half", "images": [], "question": "look \\ud83d"}',
    '{"id": "img", "images": ["pic\\ud800.png"], "question": "What?"}',
    '{"id": "lone\\udfff", "images": [], "question": "What?"}',
]


def test_lone_surrogates_are_error_lines_and_later_items_are_answered(tiny_dir, tmp_path):
    src = tmp_path / "items.jsonl"
    src.write_text("\n".join([*SURROGATE_LINES, '{"id": "after", "images": [], "question": "Say hi."}']) + "\n")
    out = tmp_path / "out.jsonl"
    for run in range(2):  # a re-run retries the error lines and fails them the same way, without a traceback
        result = batch(tiny_dir, src, "-o", out)
        assert result.exit_code == 3 and "Traceback" not in result.stderr, result.stderr
        got = rows(out)  # the file is valid UTF-8 JSON lines
        assert set(got) == {"q", "emoji-half", "img", "after"} and "answer" in got["after"]
        for item_id in ("q", "emoji-half", "img"):
            assert "lone surrogate" in got[item_id]["error"], got[item_id]
        assert "line 4: has no usable id" in result.stderr and "lone surrogate" in result.stderr
    assert len(out.read_text().splitlines()) == 4


def test_a_question_option_with_a_lone_surrogate_is_refused_up_front(tmp_path):
    with pytest.raises(Phi3vError, match="--question is not valid Unicode"):
        read_batch(tmp_path, "caf\udce9")


HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_the_same_output_is_refused_naming_the_holder(tiny_dir, tmp_path):
    src = tmp_path / "items.jsonl"
    src.write_text(json.dumps({"id": "a", "images": [], "question": "Say hi."}) + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "z", "answer": "earlier"}) + "\n")
    before = out.read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = batch(tiny_dir, src, "-o", out)
        assert result.exit_code == 1 and result.stdout == ""
        err = result.stderr.strip().splitlines()
        assert err == [f"Error: the output {out} is being written by another batch run (pid {holder.pid}): wait "
                       f"for it to finish, or choose another -o"], result.stderr
        assert out.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    assert batch(tiny_dir, src, "-o", out).exit_code == 0  # the lock went with its holder
    assert set(rows(out)) == {"z", "a"}


def _locked_elsewhere(path: Path) -> bool:
    probe = "import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\ntry:\n    fcntl.flock(fd, " \
            "fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(7)\n"
    return subprocess.run([sys.executable, "-c", probe, str(path)]).returncode == 7


def test_the_lock_survives_a_rewrite_and_is_reentrant(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "error": "x"}\n')
    with output_lock.output_lock(out):
        with output_lock.output_lock(out):  # run_batch inside the CLI's lock
            rewrite_output(out, [b'{"id": "b", "answer": "y"}\n'])  # a retry replaces the file
            assert _locked_elsewhere(out)
        assert _locked_elsewhere(out)
    assert not _locked_elsewhere(out)
    assert out.read_text() == '{"id": "b", "answer": "y"}\n'


def test_a_refused_start_leaves_no_empty_output(tmp_path):
    out = tmp_path / "new" / "out.jsonl"
    with output_lock.output_lock(out):
        assert out.exists() and _locked_elsewhere(out)
    assert not out.exists()
