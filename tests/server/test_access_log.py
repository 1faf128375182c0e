"""The access log cannot be forged (issue 21 item 13): whatever a client puts in its request line, the log gets
exactly one line for it, without control characters, whose quoted part ends where it seems to."""

from __future__ import annotations

import io
import re
import time

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
try:
    import httpx2 as httpx  # the maintained successor the openai client itself uses (as tests/server/test_server.py)
except ImportError:
    httpx = pytest.importorskip("httpx", reason="the server tests use httpx")

from starlette.responses import PlainTextResponse  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from phi3v_ort.server.access_log import AccessLog, escape  # noqa: E402

FORGED = "/x%0a10.9.9.9%20%22GET%20/admin%22%20200%20prompt_tokens=1"
# every kind of character a terminal or a log reader treats specially: C0 and C1 controls, DEL, escape sequences,
# Unicode line and paragraph separators, bidi overrides, quotes, backslashes, spaces
NASTY = ["%0a", "%0d", "%0d%0a", "%1b[2J", "%1b]0;pwned%07", "%7f", "%c2%85", "%c2%9b31m", "%e2%80%a8", "%e2%80%a9",
         "%e2%80%ae", "%22", "%5c", "%20", "%09", "%00", "%ed%a0%80"]
LINE = re.compile(r'^\S+ "[A-Z]+ \S+" \d{3} prompt_tokens=\S+ completion_tokens=\S+ ttft_ms=\S+ total_ms=\d+$')


def unsafe(text: str) -> list[str]:
    return [c for c in text if not c.isprintable() and c != "\n"]


@pytest.mark.parametrize("char", [chr(i) for i in range(0x20)] + ["\x7f", "\x85", "\x9b", "\u2028", "\u202e",
                                                                  "\ud800", '"', "\\", " "])
def test_escape_leaves_no_character_a_line_could_break_on(char):
    escaped = escape(f"/a{char}b")
    assert escaped.isprintable() and " " not in escaped
    assert escaped.replace('\\"', "").count('"') == 0
    assert escaped != f"/a{char}b"


def test_escape_keeps_ordinary_text():
    assert escape("/v1/chat/completions?x=1&y=%C3%A9") == "/v1/chat/completions?x=1&y=%C3%A9"
    assert escape("/caf\u00e9/\u56fe") == "/caf\u00e9/\u56fe"  # printable non-ASCII stays readable


def _logged_app(stream):
    async def app(scope, receive, send):
        await PlainTextResponse("ok")(scope, receive, send)

    return AccessLog(app, stream=stream)


@pytest.mark.parametrize("piece", NASTY)
def test_one_plain_line_per_request_whatever_the_path(piece):
    stream = io.StringIO()
    TestClient(_logged_app(stream), base_url="http://localhost").get(f"/p{piece}q?k={piece}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and stream.getvalue().endswith("\n") and stream.getvalue().count("\n") == 1
    assert not unsafe(lines[0]) and "\x1b" not in lines[0]
    assert LINE.match(lines[0]), lines[0]


def test_a_served_request_cannot_write_a_second_line(served):
    before = served.stderr().splitlines()
    with httpx.Client(base_url=served.url, timeout=30) as http:
        assert http.get(FORGED).status_code == 404
        assert http.get("/y%1b[31mred%1b[0m").status_code == 404
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        new = served.stderr().splitlines()[len(before):]
        if sum("/y" in line for line in new) and sum("/x" in line for line in new):
            break
        time.sleep(0.05)
    new = served.stderr().splitlines()[len(before):]
    forged = [line for line in new if "10.9.9.9" in line]
    assert len(forged) == 1 and forged[0].startswith("127.0.0.1 ") and "\\x0a10.9.9.9" in forged[0], new
    assert not any(line.startswith("10.9.9.9") for line in new)
    red = [line for line in new if "/y" in line]
    assert len(red) == 1 and "\x1b" not in red[0] and "\\x1b[31mred" in red[0]
