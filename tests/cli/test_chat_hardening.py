"""`phi3v-ort chat` under stress: turns too big for the context, Ctrl-C before and during an answer, /save over an
existing file, images the model cannot take, unexpected errors in a turn."""

import io
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from phi3v_ort.cli.chat_loop import HELP, run_chat
from phi3v_ort.cli import cli
from phi3v_ort.cli.output import format_stats
from phi3v_ort.engine.conversation import Conversation
from phi3v_ort.errors import Phi3vError
from phi3v_ort.inputs.images import load_image
from phi3v_ort.engine.model import load_model
from phi3v_ort.engine.settings import GenerationSettings
from tests.conftest import sigint_default


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(tiny_dir, device="cpu")


def chat(tiny_dir, script, *args):
    return CliRunner().invoke(cli, ["chat", "--model-dir", str(tiny_dir), "--max-new-tokens", "3", *args],
                              input="\n".join(script) + "\n")


def answers(text):
    return [line for line in text.splitlines() if line.strip()]


def errors(text):
    return [line for line in text.splitlines() if line.startswith("Error:")]


def test_a_turn_too_big_for_the_context_is_refused_and_the_history_kept(tiny_dir, png, tmp_path):
    dot = png(1, 1)  # 2509 image tokens at 16 crops: four of them cannot fit the context of 8192
    saved = [tmp_path / f"t{k}.json" for k in range(3)]
    result = chat(tiny_dir, ["Hi", *[f"/image {dot}"] * 4, "What are these?", f"/save {saved[0]}", "/detach",
                             " ".join(["word"] * 9000), f"/save {saved[1]}", "Still there?", f"/save {saved[2]}"])
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    refused = errors(result.stderr)
    assert len(refused) == 2 and all("context is 8192 tokens" in e for e in refused)
    assert "(4 images still attached; /detach drops them)" in refused[0]
    assert "still attached" not in refused[1] and "detached 4 image(s)" in result.stderr
    for path in saved[:2]:
        assert [t["question"] for t in json.loads(path.read_text())["turns"]] == ["Hi"]  # not wiped
    last = json.loads(saved[2].read_text())["turns"]
    assert [t["question"] for t in last] == ["Hi", "Still there?"] and last[1]["images"] == []
    assert len(answers(result.stdout)) == 2


def test_save_never_overwrites_unless_asked(tiny_dir, tmp_path):
    existing = tmp_path / "notes.json"
    existing.write_text("precious\n")
    result = chat(tiny_dir, ["Hi", f"/save {existing}", "/save", f"/save! {existing}"])
    assert result.exit_code == 0, result.stderr
    refused = errors(result.stderr)
    assert len(refused) == 2 and "already exists" in refused[0] and f"/save! {existing}" in refused[0]
    assert refused[1] == "Error: /save needs a file name"
    assert [t["question"] for t in json.loads(existing.read_text())["turns"]] == ["Hi"]
    assert "/save! FILE" in HELP


def test_save_refused_leaves_the_file_unchanged(tiny_dir, tmp_path):
    existing = tmp_path / "notes.json"
    existing.write_text("precious\n")
    result = chat(tiny_dir, ["Hi", f"/save {existing}", "Bye"])
    assert result.exit_code == 0 and len(errors(result.stderr)) == 1
    assert existing.read_text() == "precious\n" and len(answers(result.stdout)) == 2


def test_an_image_the_model_cannot_take_is_refused_when_attached(tiny_dir, png, tmp_path):
    thin = png(6000, 1)  # decodes fine, but its HD resize has a short side of 0 px
    transcript = tmp_path / "t.json"
    result = chat(tiny_dir, [f"/image {thin}", "What is this?", f"/image {png(64, 48)}", "And this?",
                             f"/save {transcript}"])
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    refused = errors(result.stderr)
    assert len(refused) == 1 and f"the model cannot take image {thin}" in refused[0]
    turns = json.loads(transcript.read_text())["turns"]
    assert [len(t["images"]) for t in turns] == [0, 1]
    assert len(answers(result.stdout)) == 2


def test_a_bad_image_on_the_command_line_ends_the_chat_at_once(tiny_dir, png):
    result = chat(tiny_dir, ["What is this?"], "-i", str(png(6000, 1)))
    assert result.exit_code == 1
    assert len(errors(result.stderr)) == 1 and "the model cannot take image" in result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr


class Faulty(Conversation):
    """A conversation whose next ask() fails: `fail` is raised after `after` events (None: before the prefill)."""

    fail: BaseException | None = None
    after: int | None = None

    def ask(self, question, images=()):
        fail, self.fail = self.fail, None
        if fail is not None and self.after is None:
            raise fail
        for k, event in enumerate(super().ask(question, images)):
            if fail is not None and k == self.after:
                raise fail
            yield event


def run(conversation, script, images=()):
    out, err = io.StringIO(), io.StringIO()
    code = run_chat(conversation, list(images), io.StringIO("\n".join(script) + "\n"), out, err,
                    interactive=False, format_stats=format_stats)
    assert code == 0
    return out.getvalue(), err.getvalue()


def test_ctrl_c_before_the_answer_keeps_the_images_attached(model, png):
    conv = Faulty(model, GenerationSettings(max_new_tokens=3))
    conv.fail = KeyboardInterrupt()
    out, err = run(conv, ["What is this?", "What is this, then?"], [load_image(str(png(64, 48)))])
    assert "[question cancelled; 1 image still attached]" in err and "[answer stopped]" not in err
    assert [t.question for t in conv.turns] == ["What is this, then?"]
    assert len(conv.turns[0].images) == 1 and conv.last_stats.image_tokens  # the image went with the next one
    assert len(answers(out)) == 1


def test_ctrl_c_during_the_answer_gives_the_images_to_that_turn(model, png):
    conv = Faulty(model, GenerationSettings(max_new_tokens=5))
    conv.fail, conv.after = KeyboardInterrupt(), 2
    out, err = run(conv, ["What is this?", "And now?"], [load_image(str(png(64, 48)))])
    assert "[answer stopped]" in err and "cancelled" not in err
    assert [len(t.images) for t in conv.turns] == [1, 0]
    assert len(conv.turns[0].answer_ids) == 3  # the third token was generated when Ctrl-C came: og holds it
    assert len(answers(out)) == 2


def test_an_unexpected_error_in_a_turn_is_one_line_and_the_chat_goes_on(model, png):
    conv = Faulty(model, GenerationSettings(max_new_tokens=3))
    conv.fail = RuntimeError("boom\nin two lines")
    out, err = run(conv, ["What is this?", "/detach", "Text only?"], [load_image(str(png(64, 48)))])
    assert errors(err) == ["Error: RuntimeError: boom in two lines (1 image still attached; /detach drops them)"]
    assert "detached 1 image(s)" in err
    assert [t.question for t in conv.turns] == ["Text only?"] and conv.turns[0].images == []
    # after the turn started, the error ends it like Ctrl-C does: its images stay with it
    conv.fail, conv.after = ValueError("bad"), 1
    out, err = run(conv, ["More?", "/nonsense", "Again?"], [load_image(str(png(64, 48)))])
    assert errors(err) == ["Error: ValueError: bad", "Error: unknown command /nonsense (/help lists them)"]
    assert [len(t.images) for t in conv.turns] == [0, 1, 0]


def test_command_line_images_are_prepared_before_the_chat_starts(model, png):
    conv = Conversation(model, GenerationSettings(max_new_tokens=3))
    with pytest.raises(Phi3vError, match="the model cannot take image"):
        run(conv, ["Never asked"], [load_image(str(png(6000, 1)))])


def test_sigint_during_an_answer_stops_it_and_the_chat_goes_on(tiny_dir, tmp_path):
    transcript = tmp_path / "t.json"
    cmd = [sys.executable, "-m", "phi3v_ort", "chat", "--model-dir", str(tiny_dir), "--max-new-tokens", "8000",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=sigint_default)
    proc.stdin.write(b"Tell me a long story.\n")
    proc.stdin.flush()
    received = b""
    deadline = time.time() + 60
    while len(received) < 20 and time.time() < deadline:  # the answer is streaming
        if select.select([proc.stdout], [], [], 0.5)[0]:
            received += os.read(proc.stdout.fileno(), 4096)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(f"/save {transcript}\n".encode(), timeout=60)
    err = err.decode()
    assert proc.returncode == 0, err
    assert "[answer stopped]" in err and "Traceback" not in err and "cancelled" not in err
    turns = json.loads(transcript.read_text())["turns"]
    assert [t["question"] for t in turns] == ["Tell me a long story."]
    assert 0 < len(turns[0]["answer_ids"]) < 8000
