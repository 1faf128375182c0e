"""`phi3v-ort chat` driven through stdin, and `phi3v-ort batch` with a bad item, an interruption and a resume."""

import json
import signal
import subprocess
import sys
import time

from click.testing import CliRunner

from phi3v_ort.cli import cli
from tests.conftest import sigint_default


def test_chat_through_stdin(tiny_dir, png, tmp_path):
    transcript = tmp_path / "chat.json"
    script = "\n".join([
        "What is this?",
        "/stats",
        "And the author?",
        f"/save {transcript}",
        f"/image {png(300, 700, seed=2)}",
        "And this one?",
        "/nonsense",
        "/reset",
        "/stats",
    ]) + "\n"
    result = CliRunner().invoke(cli, ["chat", "--model-dir", str(tiny_dir), "--max-new-tokens", "5",
                                      "-i", str(png(640, 400, seed=1))], input=script)
    assert result.exit_code == 0, result.stderr
    answers = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(answers) == 3  # three questions, three streamed answers
    assert "time to 1st token" in result.stderr and "prompt tokens      1937" in result.stderr
    assert "re-prefilling the conversation: a new image" in result.stderr
    assert "Error: unknown command /nonsense" in result.stderr and "no answer yet" in result.stderr
    saved = json.loads(transcript.read_text())
    assert [t["question"] for t in saved["turns"]] == ["What is this?", "And the author?"]
    assert saved["last_stats"]["kv_reused"] is True and saved["last_stats"]["prompt_tokens"] < 30
    assert "Traceback" not in result.stderr


def test_chat_save_failure_keeps_the_chat_going(tiny_dir, tmp_path):
    result = CliRunner().invoke(cli, ["chat", "--model-dir", str(tiny_dir), "--max-new-tokens", "2"],
                                input=f"Hi\n/save {tmp_path}/no/such/dir/t.json\nStill there?\n")
    assert result.exit_code == 0
    assert "Error: cannot save the transcript" in result.stderr
    assert len([line for line in result.stdout.splitlines() if line.strip()]) == 2


def _lines(path):
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.decode().splitlines()]


def test_batch_folder_with_a_bad_image(tiny_dir, png, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    png(640, 400, seed=1, name="in/a.png")
    (folder / "b.png").write_text("not an image")
    png(300, 700, seed=2, name="in/c.png")
    out = tmp_path / "out.jsonl"
    args = ["batch", str(folder), "-o", str(out), "--question", "What is this?", "--model-dir", str(tiny_dir),
            "--max-new-tokens", "4"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 3, result.stderr  # finished, but an item failed
    by_id = {r["id"]: r for r in _lines(out)}  # lines come in order of completion
    assert sorted(by_id) == ["a.png", "b.png", "c.png"] and len(_lines(out)) == 3
    assert "error" in by_id["b.png"] and "not an image" in by_id["b.png"]["error"]
    assert by_id["a.png"]["stats"]["image_tokens"] == [1921] and by_id["c.png"]["stats"]["image_tokens"] == [2377]
    rows = [by_id["a.png"]]
    # the same answers as `run` gives for the same image
    single = CliRunner().invoke(cli, ["run", "--model-dir", str(tiny_dir), "--json", "--max-new-tokens", "4",
                                      "-i", str(folder / "a.png"), "What is this?"])
    assert json.loads(single.stdout)["token_ids"] == rows[0]["token_ids"]
    again = CliRunner().invoke(cli, args)  # resume: the failed item is retried, the others are done
    assert "0 answered, 1 failed, 2 already done" in again.stderr and again.exit_code == 3
    kept = CliRunner().invoke(cli, [*args, "--no-retry-errors"])
    assert "0 answered, 0 failed, 2 already done" in kept.stderr and "1 earlier error kept" in kept.stderr.replace("errors", "error")
    assert len(_lines(out)) == 3


def test_batch_jsonl_interrupted_and_resumed(tiny_dir, png, tmp_path):
    items = tmp_path / "items.jsonl"
    rows = [{"id": f"q{k}", "images": [str(png(200 + 40 * k, 300, seed=k))], "question": "Describe it."}
            for k in range(6)]
    rows.insert(3, {"id": "text-only", "images": [], "question": "Say hello."})
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "phi3v_ort", "batch", str(items), "-o", str(out), "--model-dir", str(tiny_dir),
           "--max-new-tokens", "400"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=sigint_default)
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err
    first = _lines(out)
    assert 2 <= len(first) < len(rows)
    # a kill in the middle of a write leaves a partial line: the next run cuts it off before appending
    with out.open("ab") as f:
        f.write(b'{"id": "q5", "answer": "half a li')
    proc = subprocess.run(cmd, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    final = _lines(out)
    ids = [r["id"] for r in final]
    assert sorted(ids) == sorted(r["id"] for r in rows) and len(ids) == len(set(ids))  # no loss, no duplicates
    assert final[: len(first)] == first  # what was there is untouched
    assert all("answer" in r for r in final)


def test_batch_bad_input_file(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "question": "ok"}\nnot json\n')
    result = CliRunner().invoke(cli, ["batch", str(bad), "-o", str(tmp_path / "o.jsonl"), "--model-dir", str(tiny_dir),
                                      "--max-new-tokens", "4"])
    assert result.exit_code == 3 and "line 2" in result.stderr and "Traceback" not in result.stderr
    assert [r["id"] for r in _lines(tmp_path / "o.jsonl")] == ["1"]  # the good line still ran


def test_batch_two_workers_killed_and_resumed(tiny_dir, png, tmp_path):
    """`--workers 2`: two model processes, one writer. kill -9 of the parent mid-run loses nothing written and
    leaves no worker behind; the resumed run completes every id exactly once."""
    import os

    items = tmp_path / "items.jsonl"
    rows = [{"id": f"q{k}", "images": [str(png(200 + 30 * k, 300, seed=k))], "question": "Describe it."}
            for k in range(8)]
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "phi3v_ort", "batch", str(items), "-o", str(out), "--model-dir", str(tiny_dir),
           "--max-new-tokens", "300", "--workers", "2", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 2):
        time.sleep(0.05)
    children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                 text=True).stdout.split()]
    proc.kill()
    proc.wait(timeout=30)
    first = _lines(out) if out.read_bytes().endswith(b"\n") else None
    for _ in range(100):  # the workers notice the closed pipe and exit
        if not any(os.path.exists(f"/proc/{pid}") and "zombie" not in _state(pid) for pid in children):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"worker processes outlived the killed batch: {children}")
    done = subprocess.run(cmd, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    final = _lines(out)
    ids = [r["id"] for r in final]
    assert sorted(ids) == sorted(r["id"] for r in rows) and len(ids) == len(set(ids))
    if first is not None:
        assert final[: len(first)] == first  # what was written before the kill is untouched
    assert all("answer" in r for r in final)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((line for line in f if line.startswith("State:")), "").lower()
    except OSError:
        return "zombie"
