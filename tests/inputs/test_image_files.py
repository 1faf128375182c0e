"""Only regular files are read as images: a FIFO (opening it blocks until a writer comes), a device (endless, or
acting on being opened), a socket or a folder, directly or through a symlink, is one sentence before it is opened."""

import os
import socket
import threading

import pytest

from phi3v_ort.errors import Phi3vError
from phi3v_ort.inputs.images import load_image


def _load_with_deadline(path, timeout=10.0):
    outcome = []

    def target():
        try:
            outcome.append(load_image(str(path)))
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"load_image({path}) did not return within {timeout} s"
    return outcome[0]


@pytest.fixture
def specials(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    sock_path = tmp_path / "s.png"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    link = tmp_path / "link.png"
    link.symlink_to(fifo)
    yield {"fifo": (fifo, "a named pipe (FIFO)"), "folder": (folder, "a directory"),
           "socket": (sock_path, "a socket"), "symlink to a fifo": (link, "a named pipe (FIFO)"),
           "char device": ("/dev/zero", "a character device"), "null": ("/dev/null", "a character device")}
    sock.close()


@pytest.mark.parametrize("kind", ["fifo", "folder", "socket", "symlink to a fifo", "char device", "null"])
def test_anything_but_a_regular_file_is_refused_without_opening_it(specials, kind):
    path, words = specials[kind]
    outcome = _load_with_deadline(path)
    assert isinstance(outcome, Phi3vError), outcome
    assert str(outcome) == f"image path {path} is {words}, not an image file"


def test_a_regular_file_and_a_symlink_to_one_still_load(png, tmp_path):
    picture = png(32, 24, name="pic.png")
    link = tmp_path / "link-to-pic.png"
    link.symlink_to(picture)
    assert load_image(str(picture)).width == 32 and load_image(str(link)).height == 24
    with pytest.raises(Phi3vError, match="image file not found"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(Phi3vError, match="cannot read image"):
        load_image(str(tmp_path / ("x" * 300 + ".png")))  # a name too long for the file system
