"""The remote-image fetcher against real loopback HTTP servers: address checks on every hop, one DNS lookup per hop,
one deadline, size and type limits, and failures a client cannot tell apart."""

from __future__ import annotations

import io
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from phi3v_ort.errors import Phi3vError
from phi3v_ort.inputs.remote import RemoteImageError, fetch_image_bytes, is_blocked_address

NEUTRAL = "the address is not allowed or did not answer with an image in time"


def _png() -> bytes:
    out = io.BytesIO()
    Image.linear_gradient("L").resize((32, 24)).convert("RGB").save(out, format="PNG")
    return out.getvalue()


PNG = _png()


class Server:
    """A real HTTP server on a loopback address; ``respond(handler)`` writes each response, requests are recorded."""

    def __init__(self, respond, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 -- http.server's naming
                outer.requests.append({"path": self.path, "headers": dict(self.headers)})
                try:
                    respond(self)
                except OSError:  # the client gave up (deadline, size limit): expected in several tests
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # trickling handlers must not hold up the test's teardown
        self.httpd.handle_error = lambda *args: None  # failed handshakes are what some tests want
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.host, self.port = self.httpd.server_address[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers: list[Server] = []

    def _start(respond, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> Server:
        servers.append(Server(respond, host, port, tls))
        return servers[-1]

    yield _start
    for server in servers:
        server.close()


def send(status: int = 200, body: bytes = PNG, content_type: str | None = "image/png", headers: dict | None = None,
         length: bool = True):
    def respond(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        if content_type is not None:
            h.send_header("Content-Type", content_type)
        if length:
            h.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(body)

    return respond


def redirect(location: str, status: int = 302):
    return send(status, b"", None, {"Location": location})


def fetch(url: str, **kw) -> bytes:
    kw.setdefault("max_bytes", 1 << 20)
    kw.setdefault("deadline_s", 5.0)
    return fetch_image_bytes(url, **kw)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the plain path ---------------------------------------------------------------------------------------------------

def test_fetches_exact_png_bytes_from_loopback_when_private_allowed(serve):
    server = serve(send())
    assert fetch(server.url + "/cat.png?size=small", allow_private=True) == PNG
    assert server.requests[0]["path"] == "/cat.png?size=small"
    assert server.requests[0]["headers"]["Host"] == f"127.0.0.1:{server.port}"


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "IMAGE/JPEG; charset=binary"])
def test_missing_octet_stream_and_any_image_type_are_accepted(serve, content_type):
    server = serve(send(content_type=content_type))
    assert fetch(server.url + "/", allow_private=True) == PNG


def test_body_without_content_length_is_read_to_the_end(serve):
    server = serve(send(length=False))
    assert fetch(server.url + "/", allow_private=True) == PNG


def test_remote_image_error_is_a_phi3v_error():
    assert issubclass(RemoteImageError, Phi3vError)


# -- address checks ---------------------------------------------------------------------------------------------------

def test_loopback_is_refused_by_default_before_any_request(serve):
    server = serve(send())
    with pytest.raises(RemoteImageError) as err:
        fetch(server.url + "/cat.png")
    assert NEUTRAL in str(err.value)
    assert "blocked address 127.0.0.1" in err.value.detail
    assert server.requests == []


def test_redirect_to_a_blocked_address_is_refused_and_never_contacted(serve):
    target = serve(send(), host="127.0.0.2")  # Linux routes all of 127/8 to lo
    first = serve(redirect(f"http://127.0.0.2:{target.port}/cat.png"))
    with pytest.raises(RemoteImageError) as err:
        fetch(first.url + "/", is_blocked=lambda ip: str(ip) == "127.0.0.2")
    assert NEUTRAL in str(err.value)
    assert "127.0.0.2" in err.value.detail and "127.0.0.2" not in str(err.value)
    assert len(first.requests) == 1
    assert target.requests == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_to_an_allowed_address_is_followed(serve, status):
    target = serve(send(), host="127.0.0.2")
    first = serve(redirect(f"http://127.0.0.2:{target.port}/cat.png", status))
    assert fetch(first.url + "/", is_blocked=lambda ip: str(ip) != "127.0.0.1" and str(ip) != "127.0.0.2") == PNG
    assert [r["path"] for r in target.requests] == ["/cat.png"]


def test_relative_redirect_is_resolved_against_the_current_url(serve):
    def respond(h):
        (redirect("../img/cat.png") if h.path == "/a/b" else send())(h)

    server = serve(respond)
    assert fetch(server.url + "/a/b", allow_private=True) == PNG
    assert [r["path"] for r in server.requests] == ["/a/b", "/img/cat.png"]


def test_redirect_loop_fails_after_max_redirects(serve):
    server = serve(redirect("/again"))
    with pytest.raises(RemoteImageError) as err:
        fetch(server.url + "/", allow_private=True, max_redirects=2)
    assert NEUTRAL in str(err.value)
    assert "more than 2 redirects" in err.value.detail
    assert len(server.requests) == 3  # the first request and two redirects


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x", "http://user:pw@127.0.0.1/"])
def test_redirect_to_an_unusable_url_is_refused_neutrally(serve, location):
    server = serve(redirect(location))
    with pytest.raises(RemoteImageError) as err:
        fetch(server.url + "/", allow_private=True)
    assert NEUTRAL in str(err.value)
    assert "redirect to an unusable URL" in err.value.detail


def test_one_dns_lookup_per_hop_and_the_connection_goes_to_the_checked_address(serve, monkeypatch):
    server = serve(send())
    first = serve(redirect(f"http://cdn.example.test:{server.port}/cat.png"))
    calls: list[str] = []
    real = socket.getaddrinfo

    def resolver(host, port, *args, **kwargs):
        calls.append(host)
        if host.endswith(".example.test"):
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    checked: list[str] = []

    def allow_all(ip):
        checked.append(str(ip))
        return False

    url = f"http://images.example.test:{first.port}/start"
    assert fetch(url, is_blocked=allow_all) == PNG
    assert calls == ["images.example.test", "cdn.example.test"]  # once per hop, never again for the connect
    assert checked == ["127.0.0.1", "127.0.0.1"]
    assert first.requests[0]["headers"]["Host"] == f"images.example.test:{first.port}"
    assert server.requests[0]["headers"]["Host"] == f"cdn.example.test:{server.port}"


def test_https_uses_the_hostname_for_sni_and_certificate_while_connecting_to_the_checked_address(
        serve, monkeypatch, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=images.example.test", "-addext",
                    "subjectAltName=DNS:images.example.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server_names: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)
    server = serve(send(), tls=context)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the self-signed certificate is the only trusted root
    calls: list[str] = []

    def resolver(host, port, *args, **kwargs):
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    assert fetch(f"https://images.example.test:{server.port}/cat.png", is_blocked=lambda ip: False) == PNG
    assert calls == ["images.example.test"]
    assert server_names == ["images.example.test"]
    assert server.requests[0]["headers"]["Host"] == f"images.example.test:{server.port}"

    # same address, a name the certificate does not cover: verification is against the name, so it fails
    with pytest.raises(RemoteImageError) as err:
        fetch(f"https://other.example.test:{server.port}/cat.png", is_blocked=lambda ip: False)
    assert NEUTRAL in str(err.value)
    assert "hostname mismatch" in err.value.detail.lower(), err.value.detail


def test_a_name_resolving_to_any_blocked_address_is_refused(serve, monkeypatch):
    server = serve(send())

    def resolver(host, port, *args, **kwargs):  # one public and one blocked answer: the blocked one decides
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port)),
                (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.3", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    with pytest.raises(RemoteImageError) as err:
        fetch(f"http://images.example.test:{server.port}/", is_blocked=lambda ip: str(ip) == "127.0.0.3")
    assert "127.0.0.3" in err.value.detail
    assert server.requests == []


# -- one deadline -----------------------------------------------------------------------------------------------------

def test_a_trickling_body_fails_at_the_deadline_not_per_read(serve):
    def trickle(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", "1000")
        h.end_headers()
        for _ in range(1000):
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(0.3)

    server = serve(trickle)
    start = time.monotonic()
    with pytest.raises(RemoteImageError) as err:
        fetch(server.url + "/", allow_private=True, deadline_s=1.5)
    assert time.monotonic() - start < 3.0
    assert NEUTRAL in str(err.value)
    assert "Timeout" in err.value.detail or "deadline" in err.value.detail


def test_trickling_headers_also_fail_at_the_deadline(serve):
    def trickle(h):
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(1000):  # an endless header line, one byte at a time
            h.wfile.write(b"X")
            h.wfile.flush()
            time.sleep(0.3)

    server = serve(trickle)
    start = time.monotonic()
    with pytest.raises(RemoteImageError):
        fetch(server.url + "/", allow_private=True, deadline_s=1.5)
    assert time.monotonic() - start < 3.0


def test_the_deadline_spans_redirects(serve):
    def slow_redirect(h):
        time.sleep(0.4)
        redirect("/again")(h)

    server = serve(slow_redirect)
    start = time.monotonic()
    with pytest.raises(RemoteImageError) as err:
        fetch(server.url + "/", allow_private=True, deadline_s=1.0, max_redirects=10)
    assert time.monotonic() - start < 2.0
    assert len(server.requests) <= 3  # 0.4 s each: the third cannot finish inside 1 s
    assert "redirects" not in err.value.detail


# -- failures look alike ----------------------------------------------------------------------------------------------

def test_refused_json_and_blocked_read_the_same_but_detail_differs(serve):
    port = closed_port()
    url = f"http://127.0.0.1:{port}/cat.png"
    with pytest.raises(RemoteImageError) as refused:
        fetch(url, allow_private=True)
    server = serve(send(body=b'{"secret": "internal"}', content_type="application/json"), port=port)
    with pytest.raises(RemoteImageError) as json_answer:
        fetch(url, allow_private=True)
    with pytest.raises(RemoteImageError) as blocked:
        fetch(url)
    assert len(server.requests) == 1  # the json answer; the blocked fetch never connected

    assert str(refused.value) == str(json_answer.value) == str(blocked.value)
    assert str(refused.value) == f"could not fetch the image at http://127.0.0.1:{port}/...: {NEUTRAL}"
    details = [refused.value.detail, json_answer.value.detail, blocked.value.detail]
    assert len(set(details)) == 3
    assert "Connection" in details[0] or "refused" in details[0]
    assert "application/json" in details[1]
    assert "blocked" in details[2]


@pytest.mark.parametrize("respond, cause", [(send(404, b"not here", "text/plain"), "HTTP 404"),
                                            (send(500, b"oops", "image/png"), "HTTP 500"),
                                            (send(300, b"", None), "HTTP 300"),
                                            (send(302, b"", None), "without a Location"),
                                            (send(content_type="text/html"), "text/html")])
def test_bad_status_and_type_are_neutral(serve, respond, cause):
    server = serve(respond)
    with pytest.raises(RemoteImageError) as err:
        fetch(server.url + "/x", allow_private=True)
    assert str(err.value) == f"could not fetch the image at {server.url}/...: {NEUTRAL}"
    assert cause in err.value.detail


def test_tls_failure_is_neutral(serve):
    server = serve(send())  # plain HTTP: the TLS handshake cannot succeed
    with pytest.raises(RemoteImageError) as err:
        fetch(f"https://127.0.0.1:{server.port}/x", allow_private=True)
    assert str(err.value) == f"could not fetch the image at https://127.0.0.1:{server.port}/...: {NEUTRAL}"
    assert "SSL" in err.value.detail


def test_dns_failure_is_neutral():
    with pytest.raises(RemoteImageError) as err:
        fetch("http://no-such-host.invalid/x.png")
    assert str(err.value) == f"could not fetch the image at http://no-such-host.invalid/...: {NEUTRAL}"
    assert "gaierror" in err.value.detail or "DNS lookup" in err.value.detail  # no resolver at all: the deadline


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "file:///etc/passwd", "gopher://example.com/",
                                 "http://user:secret@example.com/a.png", "http:///a.png", "http://example.com:99999/"])
def test_unusable_urls_are_refused_before_any_lookup(url, monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("no lookup for an unusable URL"))
    with pytest.raises(RemoteImageError, match="is not usable"):
        fetch(url)


# -- size -------------------------------------------------------------------------------------------------------------

def test_content_length_over_the_limit_is_refused(serve):
    server = serve(send(body=b"x" * 5000, content_type="image/png"))
    with pytest.raises(RemoteImageError) as err:
        fetch(server.url + "/", allow_private=True, max_bytes=4096)
    assert "larger than the 4,096 bytes limit" in str(err.value)
    assert "Content-Length 5000" in err.value.detail


def test_body_over_the_limit_without_content_length_is_refused(serve):
    def endless(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.end_headers()
        for _ in range(10_000):  # 640 MB if anyone read it all
            h.wfile.write(b"x" * 65536)

    server = serve(endless)
    with pytest.raises(RemoteImageError) as err:
        fetch(server.url + "/", allow_private=True, max_bytes=100_000)
    assert "larger than" in str(err.value)
    assert "body over 100000 bytes" in err.value.detail


def test_a_body_exactly_at_the_limit_is_accepted(serve):
    server = serve(send(length=False))
    assert fetch(server.url + "/", allow_private=True, max_bytes=len(PNG)) == PNG


# -- the address predicate --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("address, blocked", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("10.1.2.3", True), ("172.16.0.1", True), ("192.168.1.1", True),
    ("169.254.10.10", True), ("169.254.169.254", True), ("100.100.100.200", True), ("100.64.0.1", True),
    ("100.127.255.254", True), ("0.0.0.0", True), ("224.0.0.1", True), ("239.255.255.250", True),
    ("240.0.0.1", True), ("255.255.255.255", True), ("192.0.2.1", True),
    ("::1", True), ("::", True), ("fe80::1", True), ("fe80::1%1", True), ("fc00::1", True), ("fd00:ec2::254", True),
    ("ff02::1", True), ("fec0::1", True), ("2001:db8::1", True),
    ("::ffff:127.0.0.1", True), ("::ffff:10.0.0.1", True), ("::ffff:169.254.169.254", True),
    ("::ffff:100.64.0.1", True), ("2002:7f00:1::", True), ("::127.0.0.1", True),
    ("8.8.8.8", False), ("1.1.1.1", False), ("100.63.255.255", False), ("100.128.0.1", False),
    ("2606:4700:4700::1111", False), ("2001:4860:4860::8888", False), ("::ffff:8.8.8.8", False),
])
def test_is_blocked_address(address, blocked):
    assert is_blocked_address(ipaddress.ip_address(address)) is blocked
    assert is_blocked_address(address) is blocked
