"""Web pages cannot drive the server (issue 21 item 9): a Host it was not told about is a 403 (DNS rebinding), the
API's POSTs must be JSON (a cross-origin page cannot send that without a preflight, which is refused)."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
try:
    import httpx2 as httpx  # the maintained successor the openai client itself uses (as tests/server/test_server.py)
except ImportError:
    httpx = pytest.importorskip("httpx", reason="the server tests use httpx")

from phi3v_ort.server.guard import allowed_hosts, check_host, check_json_content, host_name  # noqa: E402
from phi3v_ort.server.openai_request import ApiError  # noqa: E402
from tests.conftest import Served  # noqa: E402

BODY = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}


@pytest.mark.parametrize("header, host", [("localhost:8000", "localhost"), ("LOCALHOST.", "localhost"),
                                          ("[::1]:8000", "::1"), ("[::1]", "::1"), ("127.0.0.1", "127.0.0.1"),
                                          ("evil.example:80", "evil.example"), ("", "")])
def test_the_host_is_read_without_its_port(header, host):
    assert host_name(header) == host


def test_loopback_and_the_bound_address_are_allowed_by_default():
    assert allowed_hosts() == {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts("0.0.0.0") == allowed_hosts("::") == allowed_hosts()  # a wildcard names no host
    assert "myhost.lan" in allowed_hosts("myhost.lan")
    assert {"a.example", "b.example"} <= allowed_hosts(None, ["A.example", " b.example "])


@pytest.mark.parametrize("header", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io",
                                    "", None])
def test_a_name_it_was_not_told_is_refused(header):
    with pytest.raises(ApiError) as refused:
        check_host(header, allowed_hosts())
    assert refused.value.status == 403 and "--allowed-hosts" in refused.value.message
    check_host(header or "x", allowed_hosts(None, ["*"]))  # `*`: any


@pytest.mark.parametrize("header", ["localhost:1", "127.0.0.1:1", "[::1]:1", "10.1.2.3:8000", "[fe80::1]:80"])
def test_loopback_names_and_any_address_literal_pass(header):
    check_host(header, allowed_hosts())  # a rebinding page reaches the server by a name, never by an address


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx", "", None])
def test_a_body_not_declared_json_is_refused(content_type):
    with pytest.raises(ApiError) as refused:
        check_json_content(content_type)
    assert refused.value.status == 415 and "application/json" in refused.value.message


def test_json_with_parameters_passes():
    check_json_content("Application/JSON; charset=utf-8")


def test_a_served_server_refuses_rebinding_and_simple_requests(served):
    http = httpx.Client(base_url=served.url, timeout=60)
    for path, method in (("/v1/chat/completions", "POST"), ("/", "GET"), ("/health", "GET"), ("/v1/models", "GET")):
        r = http.request(method, path, json=BODY, headers={"Host": f"attacker.example:{served.port}"})
        assert r.status_code == 403, path
        assert "attacker.example" in r.json()["error"]["message"]
    text = http.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "Hi"}]}',
                     headers={"Content-Type": "text/plain;charset=UTF-8", "Origin": "http://attacker.example"})
    assert text.status_code == 415
    form = http.post("/v1/chat/completions", data={'{"messages": [], "x": "': '"}'},
                     headers={"Origin": "http://attacker.example"})
    assert form.status_code == 415
    preflight = http.options("/v1/chat/completions", headers={
        "Origin": "http://attacker.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code >= 400 and "access-control-allow-origin" not in preflight.headers
    for host in ("localhost", "127.0.0.1", "[::1]"):
        r = http.post("/v1/chat/completions", json=BODY, headers={"Host": f"{host}:{served.port}"})
        assert r.status_code == 200, (host, r.text)
    assert http.get("/", headers={"Host": f"localhost:{served.port}"}).status_code == 200


def test_allowed_hosts_widens_what_a_server_answers(tiny_dir, tmp_path):
    server = Served(tiny_dir, tmp_path, "--allowed-hosts", "box.example,other.example", "--allowed-hosts", "third")
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        for host in ("box.example", "other.example", "third", "localhost"):
            assert http.get("/health", headers={"Host": f"{host}:{server.port}"}).status_code == 200, host
        assert http.get("/health", headers={"Host": "fourth.example"}).status_code == 403
    finally:
        server.stop()
