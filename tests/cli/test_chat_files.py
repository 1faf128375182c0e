"""`chat` and files it did not expect: `/save!` writes only regular files, atomically (never a device, a FIFO,
a symlink to one, a folder); `/image` with a FIFO or a device is one line, never a hang."""

import json
import os
import stat
import threading

import pytest
from click.testing import CliRunner

from phi3v_ort.cli.chat_loop import save_transcript
from phi3v_ort.cli import cli
from phi3v_ort.errors import Phi3vError


class Transcript:
    def to_dict(self):
        return {"turns": [{"question": "Hi", "answer": "Hello"}]}


def chat(tiny_dir, script, timeout=120):
    result = []
    thread = threading.Thread(target=lambda: result.append(CliRunner().invoke(
        cli, ["chat", "--model-dir", str(tiny_dir), "--max-new-tokens", "3"], input="\n".join(script) + "\n")),
        daemon=True)
    thread.start()
    thread.join(timeout)
    assert result, "chat did not finish"
    return result[0]


@pytest.fixture
def targets(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    to_fifo = tmp_path / "to-fifo"
    to_fifo.symlink_to(fifo)
    read_end, write_end = os.pipe()  # what fd 1 is under `chat | tee` (a terminal is a device: refused too)
    to_stdout = tmp_path / "to-stdout"
    to_stdout.symlink_to(f"/proc/self/fd/{write_end}")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    yield {"fifo": fifo, "folder": folder, "symlink to a fifo": to_fifo, "symlink to stdout": to_stdout,
           "device": "/dev/null", "dangling symlink": dangling}
    os.close(read_end)
    os.close(write_end)


@pytest.mark.parametrize("kind", ["fifo", "folder", "symlink to a fifo", "symlink to stdout", "device",
                                  "dangling symlink"])
def test_save_bang_never_replaces_what_is_not_a_regular_file(targets, kind):
    target = targets[kind]
    before = os.lstat(target)
    with pytest.raises(Phi3vError) as info:
        save_transcript(Transcript(), str(target), overwrite=True)
    assert str(info.value).startswith(str(target)) and "\n" not in str(info.value)
    after = os.lstat(target)
    assert (after.st_ino, stat.S_IFMT(after.st_mode)) == (before.st_ino, stat.S_IFMT(before.st_mode))
    assert not [p for p in os.listdir(os.path.dirname(os.path.realpath(target))) if p.endswith(".tmp")] \
        if kind != "device" else True


def test_save_bang_replaces_a_regular_file_atomically_keeping_links_and_modes(tmp_path):
    real = tmp_path / "notes.json"
    real.write_text("old\n")
    os.chmod(real, 0o600)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    save_transcript(Transcript(), str(link), overwrite=True)
    assert link.is_symlink() and json.loads(real.read_text())["turns"][0]["answer"] == "Hello"
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    fresh = tmp_path / "fresh.json"
    save_transcript(Transcript(), str(fresh))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.json", "link.json", "notes.json"]


def test_a_planted_symlink_at_a_predictable_temp_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    target = tmp_path / "t.json"
    for name in (f".{target.name}.tmp-{os.getpid()}", f".{target.name}.tmp"):
        (tmp_path / name).symlink_to(victim)
    save_transcript(Transcript(), str(target))
    assert victim.read_text() == "keep\n" and json.loads(target.read_text())["turns"]


def test_chat_image_with_a_fifo_or_a_device_is_one_line(tiny_dir, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result = chat(tiny_dir, [f"/image {fifo}", "/image /dev/zero", "Hi"])
    assert result.exit_code == 0, result.stderr
    refused = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert refused == [f"Error: image path {fifo} is a named pipe (FIFO), not an image file",
                       "Error: image path /dev/zero is a character device, not an image file"]
