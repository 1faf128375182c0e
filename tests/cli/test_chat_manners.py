"""`phi3v-ort chat` manners (issue 23): Ctrl-D leaves on a line of its own, Ctrl-C during a prefill is answered at
once, /load continues a conversation saved with /save."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from phi3v_ort.cli.chat_loop import HELP, run_chat
from phi3v_ort.cli.output import format_stats
from phi3v_ort.cli.prefill_notice import MESSAGE
from phi3v_ort.engine.conversation import Conversation
from phi3v_ort.engine.model import load_model
from phi3v_ort.engine.settings import GenerationSettings
from tests.conftest import ROOT, sigint_default


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(tiny_dir, device="cpu")


def run(conversation, script):
    out, err = io.StringIO(), io.StringIO()
    code = run_chat(conversation, [], io.StringIO("\n".join(script) + "\n"), out, err, interactive=False,
                    format_stats=format_stats)
    assert code == 0
    return out.getvalue(), err.getvalue()


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the other end is closed
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_ctrl_d_leaves_on_a_line_of_its_own(tiny_dir):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "phi3v_ort", "chat", "--model-dir", str(tiny_dir)],
                            stdin=slave, stdout=slave, stderr=slave, preexec_fn=sigint_default)
    os.close(slave)
    try:
        assert b"> " in _read_until(master, b"> ", 120)
        os.write(master, b"\x04")  # Ctrl-D at the prompt
        proc.wait(timeout=60)
        rest = _read_until(master, b"\n", 5)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert rest.startswith(b"\r\n") or rest.startswith(b"\n"), rest  # the shell's prompt starts a new line


# A chat whose "prefill" holds the GIL for seconds, as og's does: a builtin loop Python's handler cannot break into.
SLOW_PREFILL = textwrap.dedent("""
    import io, os, sys
    from phi3v_ort.cli.chat_loop import run_chat
    from phi3v_ort.cli.output import format_stats

    class Pipeline:
        def image_tokens(self, image):
            return 0

    class SlowPrefill:
        turns, pipeline = [], Pipeline()

        def ask(self, question, images):
            os.write(2, b"PREFILL STARTED\\n")
            try:
                sum(range(200_000_000))  # holds the GIL until it returns, seconds on this machine
            finally:  # Python's handler raises KeyboardInterrupt as soon as sum returns
                os.write(2, b"PREFILL ENDED\\n")
            yield from ()

    sys.exit(run_chat(SlowPrefill(), [], io.StringIO("Describe it.\\n"), sys.stdout, sys.stderr,
                      interactive=False, format_stats=format_stats))
""")


def test_ctrl_c_during_a_prefill_says_at_once_that_the_question_will_be_cancelled():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "runtime"), str(ROOT)])}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PREFILL], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, preexec_fn=sigint_default)
    try:
        assert b"PREFILL STARTED" in _read_until(proc.stderr.fileno(), b"PREFILL STARTED", 60)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err.decode()
    assert proc.returncode == 0, err
    notice = MESSAGE.strip()
    # the sentence came while the prefill still held the GIL, then the question was cancelled when it ended
    assert notice in err and err.index(notice) < err.index("PREFILL ENDED"), err
    assert err.index("PREFILL ENDED") < err.index("[question cancelled]")


def test_the_notice_listens_only_during_a_prefill(model):
    conversation = Conversation(model, GenerationSettings(max_new_tokens=3))
    run(conversation, ["Hello", "Again"])
    # the wakeup fd is set around each prefill and given back after it: a Ctrl-C at the prompt says nothing new
    assert signal.set_wakeup_fd(-1) == -1


def test_load_continues_a_saved_conversation_with_the_same_tokens(model, png, tmp_path):
    image = str(png(96, 64, seed=3))
    settings = GenerationSettings(max_new_tokens=6)
    first = Conversation(model, settings, system="Be brief.")
    saved = tmp_path / "t.json"
    run(first, [f"/image {image}", "What is this?", f"/save {saved}", "And the colours?"])
    straight = first.turns[-1].answer_ids

    later = Conversation(model, settings)
    out, err = run(later, [f"/load {saved}", "And the colours?"])
    assert "loaded 1 turn from" in err and "Error" not in err, err
    assert later.system == "Be brief." and [t.question for t in later.turns] == ["What is this?", "And the colours?"]
    assert len(later.turns[0].images) == 1
    assert later.turns[-1].answer_ids == straight  # the model read exactly the transcript it wrote
    assert "/load FILE" in HELP


def test_a_bad_transcript_is_one_line_and_the_conversation_stays(model, tmp_path):
    conversation = Conversation(model, GenerationSettings(max_new_tokens=3))
    not_json = tmp_path / "notes.txt"
    not_json.write_text("precious\n")
    gone = tmp_path / "gone.json"
    gone.write_text(json.dumps({"system": None, "turns": [{"question": "Hi", "images": [str(tmp_path / "x.png")],
                                                           "answer": "", "answer_ids": []}]}))
    _, err = run(conversation, ["Hello", f"/load {not_json}", f"/load {gone}", "/load", f"/load {tmp_path / 'no'}"])
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 4, err
    assert "not a transcript saved with /save" in lines[0]
    assert "turn 1's image cannot be loaded again" in lines[1] and "x.png" in lines[1]
    assert lines[2] == "Error: /load needs a file saved with /save"
    assert "cannot read" in lines[3]
    assert [t.question for t in conversation.turns] == ["Hello"]
    assert not_json.read_text() == "precious\n"


def test_an_image_from_stdin_cannot_be_loaded_again(model, tmp_path):
    saved = tmp_path / "t.json"
    saved.write_text(json.dumps({"system": None, "turns": [{"question": "Hi", "images": ["stdin"], "answer": "a",
                                                            "answer_ids": []}]}))
    _, err = run(Conversation(model, GenerationSettings(max_new_tokens=3)), [f"/load {saved}"])
    assert "Error: turn 1's image was read from stdin and cannot be read again" in err
