"""A small HTTP client on the standard library (http.client) for talking to a phi3v-ort server: no third-party
import on the path of a warm `run`, where every import is start-up time the user waits for."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from urllib.parse import urlsplit

from phi3v_ort.errors import Phi3vError

CONNECT_TIMEOUT_S = 5.0


def base_url(url: str) -> str:
    """`http://host:port` from what a user may give (`host:port`, a trailing `/` or `/v1`)."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Phi3vError(f"--server takes auto or an http(s) URL such as http://127.0.0.1:8000, got {url!r}")
    path = parts.path.removesuffix("/v1")
    return f"{parts.scheme}://{parts.netloc}{path}"


def connect(url: str, timeout: float | None) -> tuple[http.client.HTTPConnection, str]:
    """An open connection to the server at `url` (connecting within CONNECT_TIMEOUT_S; then `timeout` for every
    read, None: wait as long as a prefill takes) and the path prefix of its routes."""
    parts = urlsplit(base_url(url))
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.hostname, parts.port, timeout=min(CONNECT_TIMEOUT_S, timeout or CONNECT_TIMEOUT_S))
    conn.connect()
    conn.sock.settimeout(timeout)
    return conn, parts.path


def get_json(url: str, path: str, timeout: float, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """GET a JSON route: (status, body). Raises OSError (ConnectionRefusedError: nothing listens) or ValueError."""
    conn, prefix = connect(url, timeout)
    try:
        conn.request("GET", prefix + path, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def post_json(url: str, path: str, body: dict, headers: dict[str, str] | None = None,
              timeout: float | None = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """POST a JSON body; the connection and its response, open (the caller reads it, then closes the
    connection)."""
    conn, prefix = connect(url, timeout)
    try:
        data = json.dumps(body, ensure_ascii=False).encode()
        conn.request("POST", prefix + path, body=data,
                     headers={"Content-Type": "application/json", **(headers or {})})
        return conn, conn.getresponse()
    except BaseException:
        conn.close()
        raise


def sse_data(response: http.client.HTTPResponse) -> Iterator[dict]:
    """The JSON objects of a server-sent event stream's `data:` lines, up to `data: [DONE]`."""
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)
