"""What keeps web pages from driving the server (issue 21 item 9), as Ollama and Jupyter do.

- Host: a page on another site can point its own name at 127.0.0.1 (DNS rebinding) and then read the answers as
  same-origin; its requests carry that name in `Host`. The server answers only hosts it was told about: loopback
  names and addresses (localhost, 127.0.0.1, ::1), the address it is bound to when that is not a wildcard,
  `--allowed-hosts` (`*`: any). An IP address literal is always accepted (Ollama's rule): a rebinding page reaches
  the server by a name, never by an address, and a browser sends an address in Host only for a page served from it.
- Content-Type: a cross-origin page may POST `text/plain` or a form without asking (a "simple request"); JSON needs
  a CORS preflight, which this server never grants. So the API's POSTs must say `application/json` (415 otherwise).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.responses import JSONResponse

from phi3v_ort.server.openai_request import ApiError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("", "0.0.0.0", "::")


def allowed_hosts(bound_host: str | None = None, extra: Iterable[str] = ()) -> frozenset[str]:
    """The Host names a server answers: loopback, the bound address (not a wildcard), `extra` (`*`: any)."""
    hosts = set(LOOPBACK_HOSTS) | {normal_host(h) for h in extra if h.strip()}
    if bound_host is not None and normal_host(bound_host) not in WILDCARDS:
        hosts.add(normal_host(bound_host))
    return frozenset(hosts)


def normal_host(host: str) -> str:
    """A host as compared: lower case, without brackets or a trailing dot (`[::1]` -> `::1`)."""
    host = host.strip().lower().rstrip(".")
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def host_name(header: str) -> str:
    """The host of a Host header, without its port: `[::1]:8000` -> `::1`, `localhost:8000` -> `localhost`."""
    header = header.strip()
    if header.startswith("["):
        return normal_host(header[:header.find("]") + 1] if "]" in header else header)
    return normal_host(header.rsplit(":", 1)[0] if header.count(":") == 1 else header)


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_host(header: str | None, allowed: frozenset[str]) -> None:
    """Raises a 403 for a Host this server was not told to answer (see the module's docstring)."""
    if "*" in allowed:
        return
    host = host_name(header or "")
    if host in allowed or is_address(host):
        return
    raise ApiError(403, f"the Host {host or '(none)'!r} is not allowed: this server answers "
                        f"{', '.join(sorted(allowed))} and IP addresses (serve --allowed-hosts widens it)",
                   "permission_error")


def check_json_content(content_type: str | None) -> None:
    """Raises a 415 unless the body is declared JSON: a page on another site cannot send that without a preflight."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"the body must be JSON, sent with `Content-Type: application/json` "
                            f"(got {media or 'none'!r})")


class RequestGuard:
    """ASGI middleware: the Host check on every HTTP request, the Content-Type check on POSTs to /v1/."""

    def __init__(self, app, allowed: frozenset[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
            try:
                check_host(headers.get("host"), self.allowed)
                if scope.get("method") == "POST" and scope.get("path", "").startswith("/v1/"):
                    check_json_content(headers.get("content-type"))
            except ApiError as exc:
                await JSONResponse(exc.body(), status_code=exc.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)
