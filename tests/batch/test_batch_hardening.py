"""`phi3v-ort batch` hardening: bad output paths and inputs refused up front, bad lines reported one by one while the
rest runs, `images` as one string, image paths relative to the JSONL file, and failed items retried on a re-run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import phi3v_ort.cli.batch as cli_module
import phi3v_ort.batch.runner as batch_module
from phi3v_ort.cli import cli
from phi3v_ort.errors import Phi3vError

RUN = ["--max-new-tokens", "4"]


def batch(tiny_dir, *args):
    return CliRunner().invoke(cli, ["batch", *map(str, args), "--model-dir", str(tiny_dir), *RUN])


def lines(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.split(b"\n")[:-1]]


def write_jsonl(path: Path, *rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fails loudly if the command gets as far as loading the model; records the calls."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded although the command should have stopped before")

    monkeypatch.setattr(cli_module, "start_workers", refuse)
    return calls


def one_error_line(result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.stderr, result.exception)
    assert "Traceback" not in result.stderr and result.stdout == ""
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: "), result.stderr
    return err[0]


# --- 10: refused before any work, nothing harmed ------------------------------------------------------------------


@pytest.fixture
def items(tmp_path):
    return write_jsonl(tmp_path / "items.jsonl", {"id": "a", "images": [], "question": "Say hi."})


def test_output_whose_parent_is_a_file(tiny_dir, tmp_path, items, no_model):
    blocker = tmp_path / "notes.txt"
    blocker.write_bytes(b"keep me")
    for out in (blocker / "out.jsonl", blocker / "deeper" / "out.jsonl"):
        line = one_error_line(batch(tiny_dir, items, "-o", out))
        assert "is a file, not a folder" in line
    assert blocker.read_bytes() == b"keep me" and not no_model


def test_output_that_is_a_folder(tiny_dir, tmp_path, items, no_model):
    (tmp_path / "results").mkdir()
    assert "is a folder" in one_error_line(batch(tiny_dir, items, "-o", tmp_path / "results"))
    assert list((tmp_path / "results").iterdir()) == [] and not no_model


def test_output_that_is_the_input(tiny_dir, tmp_path, items, no_model):
    before = items.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jsonl").symlink_to(items)
    os.link(items, tmp_path / "hardlink.jsonl")
    spellings = [items, tmp_path / "sub" / ".." / "items.jsonl", tmp_path / "link.jsonl", tmp_path / "hardlink.jsonl",
                 os.path.relpath(items)]
    for out in spellings:
        assert "is the input file itself" in one_error_line(batch(tiny_dir, items, "-o", out)), out
        # and the other way round: the input given through the link, the output by its real name
        assert "is the input file itself" in one_error_line(batch(tiny_dir, out, "-o", items)), out
    assert items.read_bytes() == before and not no_model


def test_input_that_is_not_utf8(tiny_dir, tmp_path, no_model):
    src = tmp_path / "latin1.jsonl"
    raw = '{"id": "a", "question": "ok"}\n{"id": "b", "question": "Qu\'est-ce que c\'est, café ?"}\n'.encode("latin-1")
    src.write_bytes(raw)
    out = tmp_path / "out.jsonl"
    line = one_error_line(batch(tiny_dir, src, "-o", out))
    assert "not UTF-8" in line and "line 2" in line
    assert src.read_bytes() == raw and not out.exists() and not no_model


def test_output_that_is_not_a_result_file(tiny_dir, tmp_path, items, no_model):
    # an unrelated file (with no final newline, which a resume would otherwise cut as a "truncated last line")
    for content in (b"# my notes\nsecond line", b'{"id": "x", "images": [], "question": "no answer"}\n',
                    b"\xff\xfe binary\n"):
        out = tmp_path / "notes.txt"
        out.write_bytes(content)
        assert "not a phi3v-ort batch result file" in one_error_line(batch(tiny_dir, items, "-o", out))
        assert out.read_bytes() == content
    assert not no_model


def test_read_only_output_refused_when_the_os_says_so(tiny_dir, tmp_path, items, no_model, monkeypatch):
    """Runs as root too: stands in for the OS refusing writes (chmod for a normal user, a read-only mount for anyone),
    which is what os.access reports."""
    out = tmp_path / "ro" / "out.jsonl"
    out.parent.mkdir()
    denied = {str(out), str(out.parent)}
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if (mode & os.W_OK and str(p) in denied)
                        else real_access(p, mode, **kw))
    assert "read-only" in one_error_line(batch(tiny_dir, items, "-o", out))  # a new file in a read-only folder
    assert not out.exists()
    out.write_bytes(b'{"id": "a", "error": "earlier"}\n')
    assert "read-only" in one_error_line(batch(tiny_dir, items, "-o", out))  # an existing read-only file
    assert out.read_bytes() == b'{"id": "a", "error": "earlier"}\n' and not no_model


def test_read_only_folder_for_a_retry(tiny_dir, tmp_path, items, no_model, monkeypatch):
    """Appending needs only the file, but replacing an error line needs the folder: refused up front."""
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "a", "error": "earlier"}\n')
    real_access, folder = os.access, os.path.realpath(tmp_path)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if (mode & os.W_OK and str(p) == folder)
                        else real_access(p, mode, **kw))
    assert "--no-retry-errors" in one_error_line(batch(tiny_dir, items, "-o", out))
    assert out.read_bytes() == b'{"id": "a", "error": "earlier"}\n' and not no_model


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0,
                    reason="root writes through chmod 0o555/0o444, so the OS does not refuse and neither may we "
                           "(the case is covered through os.access above and with a read-only mount below)")
def test_read_only_by_chmod(tiny_dir, tmp_path, items, no_model):
    folder = tmp_path / "ro"
    folder.mkdir()
    existing = tmp_path / "ro-file.jsonl"
    existing.write_bytes(b'{"id": "z", "answer": "kept"}\n')
    existing.chmod(0o444)
    folder.chmod(0o555)
    try:
        assert "read-only" in one_error_line(batch(tiny_dir, items, "-o", folder / "out.jsonl"))
        assert "read-only" in one_error_line(batch(tiny_dir, items, "-o", existing))
        with pytest.raises(Phi3vError, match="read-only"):
            batch_module.check_output(folder / "out.jsonl")
    finally:
        folder.chmod(0o755)
    assert existing.read_bytes() == b'{"id": "z", "answer": "kept"}\n' and not no_model


def test_read_only_mount(tiny_dir, items, no_model):
    ro = next((p for p in ("/proc/sys", "/sys/fs/cgroup") if os.path.isdir(p) and not os.access(p, os.W_OK)), None)
    if ro is None:
        pytest.skip("no read-only mounted folder on this machine")
    assert "read-only" in one_error_line(batch(tiny_dir, items, "-o", Path(ro) / "phi3v-out.jsonl"))
    assert not no_model


# --- 11, 12, 13: bad lines reported one by one, the rest runs; images as a string, relative to the file -------------


def test_bad_lines_are_reported_and_the_rest_runs(tiny_dir, png, tmp_path):
    png(200, 300, seed=1, name="pic.png")
    src = write_jsonl(
        tmp_path / "items.jsonl",
        {"id": "good1", "images": [], "question": "Say hi."},            # 1
        "{not json",                                                     # 2: stderr only
        {"id": "noq", "images": []},                                     # 3: error line
        {"id": "good1", "images": [], "question": "Again?"},            # 4: repeated id: stderr only
        {"id": "badimg", "images": 5, "question": "What?"},             # 5: error line
        {"images": [], "question": "Who am I?"},                        # 6: no id: stderr only
        "",                                                              # 7: blank, ignored
        {"id": "good2", "images": "pic.png", "question": "Describe."},  # 8: one image as a string
        {"id": "mixed", "images": ["pic.png", 3], "question": "?"},     # 9: error line
        '["a", "list"]',                                                # 10: stderr only
    )
    out = tmp_path / "out.jsonl"
    result = batch(tiny_dir, src, "-o", out)
    assert result.exit_code == 3, result.stderr
    assert "Traceback" not in result.stderr
    reported = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert [int(line.split(" line ")[1].split(":")[0]) for line in reported] == [2, 3, 4, 5, 6, 9, 10]
    assert "no question" in reported[1] and "repeats the id 'good1' of line 1" in reported[2]
    assert "not a number" in reported[3] and "no id" in reported[4]
    rows = {r["id"]: r for r in lines(out)}
    assert len(lines(out)) == len(rows) == 5  # one line per id: the repeated id is not written twice
    assert rows["good1"]["question"] == "Say hi." and "answer" in rows["good1"]
    # images echo the input as written (a string becomes its one-item list), not rewritten to the current folder
    assert rows["good2"]["images"] == ["pic.png"] and len(rows["good2"]["stats"]["image_tokens"]) == 1
    for bad_id, words in (("noq", "no question"), ("badimg", "images must be"), ("mixed", "images must be")):
        assert "answer" not in rows[bad_id] and words in rows[bad_id]["error"], rows[bad_id]
    assert "2 answered, 3 failed, 0 already done" in result.stderr
    assert "3 items have an error line in the output, 4 input lines could not be run" in result.stderr


def test_the_summary_counts_one_item_in_the_singular(tiny_dir, tmp_path):
    src = write_jsonl(tmp_path / "items.jsonl", {"id": "ok", "images": [], "question": "Say hi."},
                      {"id": "noq", "images": []}, "{not json")
    result = batch(tiny_dir, src, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 3, result.stderr
    assert "Not complete: 1 item has an error line in the output, 1 input line could not be run" in result.stderr


def test_images_as_one_string(tmp_path):
    src = write_jsonl(tmp_path / "items.jsonl", {"id": 1, "images": "a.png", "question": "q"},
                      {"id": 2, "images": ["b.png", "c.png"], "question": "q"},
                      {"id": 3, "images": {"path": "a.png"}, "question": "q"},
                      {"id": 4, "images": None, "question": "q"})
    got = batch_module.read_batch(src)
    assert [(it.id, it.images) for it in got.items] == [("1", (str(tmp_path / "a.png"),)),
                                                        ("2", (str(tmp_path / "b.png"), str(tmp_path / "c.png")))]
    assert [(b.line, b.id) for b in got.bad] == [(3, "3"), (4, "4")]
    assert "not an object" in got.bad[0].problem and "not null" in got.bad[1].problem


def test_relative_images_resolve_from_the_jsonl_folder(tiny_dir, png, tmp_path, monkeypatch):
    (tmp_path / "data" / "pics").mkdir(parents=True)
    png(200, 300, seed=1, name="data/pics/a.png")
    absolute = png(300, 200, seed=2, name="elsewhere.png")
    src = write_jsonl(tmp_path / "data" / "items.jsonl",
                      {"id": "rel", "images": ["pics/a.png"], "question": "What is it?"},
                      {"id": "abs", "images": [str(absolute)], "question": "What is it?"},
                      {"id": "url", "images": ["https://example.com/x.png", "~/x.png"], "question": "?"})
    local = write_jsonl(tmp_path / "data" / "local.jsonl", *map(json.loads, src.read_text().splitlines()[:2]))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the current folder has nothing to do with the paths
    parsed = {it.id: it.images for it in batch_module.read_batch(os.path.relpath(src)).items}
    assert parsed["url"] == ("https://example.com/x.png", "~/x.png") and parsed["abs"] == (str(absolute),)
    assert Path(parsed["rel"][0]).resolve() == (tmp_path / "data" / "pics" / "a.png").resolve()
    out = tmp_path / "out.jsonl"
    result = batch(tiny_dir, os.path.relpath(local), "-o", out)
    assert result.exit_code == 0, result.stderr
    rows = {r["id"]: r for r in lines(out)}
    assert "answer" in rows["rel"] and "answer" in rows["abs"], rows
    assert rows["rel"]["images"] == ["pics/a.png"] and rows["abs"]["images"] == [str(absolute)]  # as written


def test_folder_input_still_works(tiny_dir, png, tmp_path, monkeypatch):
    png(200, 300, seed=1, name="a.png")
    (tmp_path / "pics").mkdir()
    png(200, 300, seed=1, name="pics/a.png")
    monkeypatch.chdir(tmp_path)
    result = batch(tiny_dir, "pics", "-o", "out.jsonl", "--question", "What?")
    assert result.exit_code == 0, result.stderr
    assert [r["id"] for r in lines(tmp_path / "out.jsonl")] == ["a.png"]


# --- 14: failed items retried on a re-run, crash-safely, one line per id ------------------------------------------


def test_failed_items_are_retried(tiny_dir, png, tmp_path):
    ok = png(200, 300, seed=1, name="ok.png")
    src = write_jsonl(tmp_path / "items.jsonl", {"id": "ok", "images": [str(ok)], "question": "What is it?"},
                      {"id": "late", "images": ["late.png"], "question": "What is it?"},
                      {"id": "text", "images": [], "question": "Say hi."})
    out = tmp_path / "out.jsonl"
    first = batch(tiny_dir, src, "-o", out)
    assert first.exit_code == 3, first.stderr
    assert "2 answered, 1 failed, 0 already done" in first.stderr and "1 item has an error line" in first.stderr
    rows = {r["id"]: r for r in lines(out)}  # lines come in order of completion
    assert sorted(rows) == ["late", "ok", "text"] and "error" in rows["late"] and len(lines(out)) == 3

    png(300, 200, seed=2, name="late.png")  # the cause of the failure is gone now
    before = out.read_bytes()
    lines_before = lines(out)
    kept = batch(tiny_dir, src, "-o", out, "--no-retry-errors")
    assert kept.exit_code == 3, kept.stderr
    assert "0 answered, 0 failed, 2 already done" in kept.stderr and "1 earlier errors kept" in kept.stderr
    assert out.read_bytes() == before

    # a run killed in the middle of a write left a partial line; the retry's rewrite drops it too
    with out.open("ab") as f:
        f.write(b'{"id": "late", "answer": "half a li')
    again = batch(tiny_dir, src, "-o", out)
    assert again.exit_code == 0, again.stderr
    assert "1 answered, 0 failed, 2 already done" in again.stderr and "1 earlier errors retried" in again.stderr
    final = lines(out)
    assert sorted(r["id"] for r in final[:2]) == ["ok", "text"] and final[2]["id"] == "late"  # the retry appended
    assert final[:2] == [r for r in lines_before if r["id"] != "late"] and "answer" in final[2] and "error" not in final[2]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.jsonl.")] == []  # no temp file left

    done = batch(tiny_dir, src, "-o", out)
    assert done.exit_code == 0 and "0 answered, 0 failed, 3 already done" in done.stderr
    assert lines(out) == final


def test_a_bad_line_keeps_failing_without_duplicates(tiny_dir, tmp_path):
    src = write_jsonl(tmp_path / "items.jsonl", {"id": "noq", "images": []}, {"id": "a", "question": "Hi?"})
    out = tmp_path / "out.jsonl"
    for _ in range(2):
        result = batch(tiny_dir, src, "-o", out)
        assert result.exit_code == 3 and "line 1: no question" in result.stderr
        assert sorted(r["id"] for r in lines(out)) == ["a", "noq"]
    assert "1 earlier errors retried" in result.stderr
    write_jsonl(src, {"id": "noq", "images": [], "question": "Fixed?"}, {"id": "a", "question": "Hi?"})
    fixed = batch(tiny_dir, src, "-o", out)
    assert fixed.exit_code == 0, fixed.stderr
    assert [r["id"] for r in lines(out)] == ["a", "noq"] and all("answer" in r for r in lines(out))


def test_retry_rewrite_is_all_or_nothing(tiny_dir, tmp_path, monkeypatch):
    """Interrupted between writing the new file and putting it in place: the old file is whole, no temp is left."""
    src = write_jsonl(tmp_path / "items.jsonl", {"id": "a", "question": "Hi?"}, {"id": "b", "question": "Yo?"})
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "a", "error": "earlier"}\n{"id": "b", "answer": "fine"}\n{"id": "other", "error": "x"}\n')
    before = out.read_bytes()
    real_replace = os.replace

    def interrupted(a, b, *args, **kwargs):
        if str(b) == str(out):
            raise KeyboardInterrupt
        return real_replace(a, b, *args, **kwargs)

    monkeypatch.setattr(os, "replace", interrupted)
    result = batch(tiny_dir, src, "-o", out)
    assert result.exit_code == 130 and "run the same command to resume" in result.stderr
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["items.jsonl", "out.jsonl"]
    monkeypatch.setattr(os, "replace", real_replace)
    result = batch(tiny_dir, src, "-o", out)
    assert result.exit_code == 0, result.stderr  # "other" is not in this input: not this run's, and left untouched
    assert out.read_bytes().startswith(before[before.index(b"\n") + 1:])
    assert [r["id"] for r in lines(out)] == ["b", "other", "a"] and "answer" in lines(out)[2]
    assert "1 answered, 0 failed, 1 already done" in result.stderr


def test_symlinked_output_stays_a_symlink(tiny_dir, tmp_path):
    src = write_jsonl(tmp_path / "items.jsonl", {"id": "a", "question": "Hi?"})
    real = tmp_path / "results" / "real.jsonl"
    real.parent.mkdir()
    real.write_bytes(b'{"id": "a", "error": "earlier"}\n')
    link = tmp_path / "out.jsonl"
    link.symlink_to(real)
    assert batch(tiny_dir, src, "-o", link).exit_code == 0
    assert link.is_symlink() and [r["id"] for r in lines(real)] == ["a"] and "answer" in lines(real)[0]


def test_a_50_mb_question_does_not_fit_at_once(tiny_dir, tmp_path):
    """Known from its length alone (73 s and 6.9 GB before, to tokenize it first); the next item still runs."""
    import subprocess
    import time

    huge = "lorem ipsum " * (50 * 2**20 // 12)
    src = write_jsonl(tmp_path / "items.jsonl", {"id": "huge", "images": [], "question": huge},
                      {"id": "ok", "images": [], "question": "Say hi."})
    out = tmp_path / "out.jsonl"
    # a wrapper process waits for the batch, so its children's peak is this batch's alone (its workers included)
    wrapper = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(rc)")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "phi3v_ort", "batch", str(src),
                             "-o", str(out), "--model-dir", str(tiny_dir), *RUN],
                            capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - started
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    rows = {r["id"]: r for r in lines(out)}
    assert "context is 8192 tokens" in rows["huge"]["error"] and "answer" in rows["ok"]
    assert took < 60, took
    peak = int(result.stdout.split()[-1])  # the batch's largest process
    assert peak < 2 * 2**30, peak
