"""Fetch an image from an http(s) URL a client gave us, without letting that client probe our network.

What urllib does not do, and this does:
- every hop (the first URL and each redirect) is resolved once and refused if any address is blocked, then the TCP
  connection goes to that checked address, so DNS cannot answer differently the second time (rebinding);
- redirects are followed by hand, at most ``max_redirects``, each hop checked the same way;
- one deadline covers DNS, connect, TLS, every redirect and every read, so a server trickling bytes fails on time;
- every failure that could tell a client what answers where (blocked, refused, timeout, status, content type, TLS)
  reads the same; the precise cause is kept in ``.detail`` for the server's log.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable
from urllib.parse import quote, urljoin, urlsplit

from phi3v_ort.errors import ImageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddrInfo = tuple  # one socket.getaddrinfo row: (family, type, proto, canonname, sockaddr)

REDIRECTS = (301, 302, 303, 307, 308)
METADATA = {ipaddress.ip_address(a) for a in ("169.254.169.254", "100.100.100.200", "fd00:ec2::254")}
CGNAT = ipaddress.ip_network("100.64.0.0/10")
CHUNK = 64 * 1024
# http.client refuses spaces, control characters and non-ASCII in a request target: percent-encode only those
_URL_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


class RemoteImageError(ImageError):
    """A remote image could not be had. str() is one sentence safe to show the client; ``detail`` says what really
    happened, for the server's log only."""

    def __init__(self, message: str, detail: str = "", cause: str = "", too_large: bool = False) -> None:
        super().__init__(message)
        self.detail = detail or message
        self.cause = cause or message  # the precise reason in a few words (for a user fetching their own URL)
        self.too_large = too_large


class _Refused(Exception):
    """A hop we will not use (blocked address, bad status or type, bad redirect): reported like a network error."""


class _TooLarge(Exception):
    """The one failure a client may be told apart: only an allowed address answering with an image gets here."""


def is_blocked_address(ip: IPAddress | str) -> bool:
    """True for every address a server should not fetch for a client: loopback, private, link-local, multicast,
    reserved, unspecified, CGNAT, the cloud metadata addresses, and IPv6 forms that embed one of those."""
    ip = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if ip.version == 6:
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d reaches a.b.c.d; judge that, not the IPv6 form
            return is_blocked_address(ip.ipv4_mapped)
        if ip.sixtofour is not None and is_blocked_address(ip.sixtofour):
            return True
        ip = ipaddress.IPv6Address(ip.packed)  # drop any %scope so the metadata lookup compares equal
    return (ip in METADATA or ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified or not ip.is_global
            or (ip.version == 4 and ip in CGNAT) or (ip.version == 6 and ip.is_site_local))


def fetch_image_bytes(url: str, *, max_bytes: int, deadline_s: float, allow_private: bool = False,
                      max_redirects: int = 3, is_blocked: Callable[[IPAddress], bool] | None = None) -> bytes:
    """The body of ``url`` (at most ``max_bytes``), following up to ``max_redirects`` redirects, all within
    ``deadline_s`` seconds. ``allow_private`` turns the address check off (a trusted intranet); ``is_blocked``
    replaces the default predicate :func:`is_blocked_address`."""
    deadline = time.monotonic() + deadline_s
    check = (lambda ip: False) if allow_private else (is_blocked or is_blocked_address)
    try:
        target = _parse(url)
    except ValueError as exc:
        raise RemoteImageError(f"image URL {url!r} is not usable: {exc}") from None
    shown = f"{target.scheme}://{target.netloc}/..."
    try:
        for _ in range(max_redirects + 1):
            body, location = _fetch_hop(target, deadline, check, max_bytes)
            if location is None:
                return body
            try:
                target = _parse(urljoin(target.geturl(), location))
            except ValueError as exc:
                raise _Refused(f"redirect to an unusable URL {location!r}: {exc}") from None
        raise _Refused(f"more than {max_redirects} redirects")
    except _TooLarge as exc:
        raise RemoteImageError(f"the image at {shown} is larger than the {_size(max_bytes)} limit",
                               detail=str(exc), too_large=True) from None
    except (_Refused, OSError, http.client.HTTPException, ValueError) as exc:
        raise RemoteImageError(f"could not fetch the image at {shown}: the address is not allowed or did not "
                               "answer with an image in time",
                               detail=f"{target.geturl()}: {type(exc).__name__}: {exc}",
                               cause=str(exc) if isinstance(exc, _Refused) else f"{type(exc).__name__}: {exc}") from None


def _parse(url: str):
    """Split an http(s) URL; anything else (other schemes, user:password@, no host, a bad port) is a ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("only http and https URLs are fetched")
    if "@" in parts.netloc:
        raise ValueError("URLs with a user name or password are not fetched")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    _ = parts.port  # raises ValueError for a port out of range or not a number
    return parts


def _fetch_hop(target, deadline: float, check: Callable[[IPAddress], bool],
               max_bytes: int) -> tuple[bytes, str | None]:
    """One request: (body, None) for an image, (b"", Location) for a redirect; _Refused/OSError otherwise."""
    host = target.hostname
    port = target.port or (443 if target.scheme == "https" else 80)
    infos = _resolve(host, port, deadline)
    for info in infos:
        try:
            ip = ipaddress.ip_address(info[4][0])
        except ValueError:
            raise _Refused(f"{host} resolved to an unreadable address {info[4][0]!r}") from None
        if check(ip):
            raise _Refused(f"{host} resolves to the blocked address {ip}")
    cls = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    conn, response = cls(host, port, infos, deadline), None
    try:
        path = quote((target.path or "/") + (f"?{target.query}" if target.query else ""), safe=_URL_SAFE)
        conn.request("GET", path, headers={"User-Agent": "phi3v-ort", "Accept": "image/*",
                                           "Connection": "close"})
        response = conn.getresponse()
        if response.status in REDIRECTS:
            location = response.getheader("Location")
            if not location:
                raise _Refused(f"HTTP {response.status} without a Location")
            return b"", location
        if not 200 <= response.status < 300:
            raise _Refused(f"HTTP {response.status} {response.reason}")
        if response.getheader("Content-Type") is not None:  # get_content_type() says text/plain when absent
            kind = response.headers.get_content_type()
            if not kind.startswith("image/") and kind != "application/octet-stream":
                raise _Refused(f"content type {kind}")
        if response.length is not None and response.length > max_bytes:
            raise _TooLarge(f"Content-Length {response.length} > {max_bytes}")
        return _read_body(response, deadline, max_bytes), None
    finally:
        if response is not None:
            response.close()
        conn.close()


def _read_body(response: http.client.HTTPResponse, deadline: float, max_bytes: int) -> bytes:
    """Read in chunks, checking the clock between them, and stop at max_bytes + 1 (enough to know it is too big)."""
    chunks, size = [], 0
    while size <= max_bytes:
        _remaining(deadline)
        chunk = response.read1(min(CHUNK, max_bytes + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > max_bytes:
        raise _TooLarge(f"body over {max_bytes} bytes")
    return b"".join(chunks)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the deadline passed")
    return left


def _resolve(host: str, port: int, deadline: float) -> list[AddrInfo]:
    """The one DNS lookup of a hop. getaddrinfo cannot be given a timeout, so it runs in a daemon thread we stop
    waiting for when the deadline passes."""
    box: dict = {}

    def lookup() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except Exception as exc:  # noqa: BLE001 -- handed to the waiting thread
            box["error"] = exc

    thread = threading.Thread(target=lookup, name="phi3v-remote-dns", daemon=True)
    thread.start()
    thread.join(_remaining(deadline))
    if thread.is_alive():
        raise TimeoutError(f"the DNS lookup of {host} outlasted the deadline")
    if "error" in box:
        raise box["error"]
    if not box["infos"]:
        raise OSError(f"{host} resolved to no address")
    return box["infos"]


def _connect(infos: list[AddrInfo], deadline: float) -> socket.socket:
    """A TCP connection to the first checked address that answers. socket.create_connection is not used: it would
    look the address up again."""
    error: OSError = OSError("no address to connect to")
    for family, type_, proto, _, sockaddr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
            if isinstance(exc, TimeoutError):
                break
    raise error


class _DeadlineReader(io.RawIOBase):
    """The raw stream under http.client's buffered reader: each recv may wait only for the time left. http.client
    reads the status line, headers and chunk sizes with readline, which loops over recvs; a timeout set once before
    it would apply to each recv and let a trickling server run far past the deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        # a real SocketIO underneath keeps the socket's reference count, so http.client closing its connection
        # (it does as soon as it sees "Connection: close") leaves the response readable, as with a plain socket
        self._sock, self._io, self._deadline = sock, sock.makefile("rb", buffering=0), deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        self._sock.settimeout(_remaining(self._deadline))
        return self._io.readinto(buffer)

    def close(self) -> None:
        self._io.close()
        super().close()


class _DeadlineSocket:
    """What http.client holds as its socket (it only sends, makes a reader, and closes), deadline-bound."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(_remaining(self._deadline))
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def close(self) -> None:
        self._sock.close()


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to ``host`` (the Host header) over a TCP connection to an address already resolved and checked."""

    def __init__(self, host: str, port: int, infos: list[AddrInfo], deadline: float) -> None:
        super().__init__(host, port)
        self._infos, self._deadline = infos, deadline

    def connect(self) -> None:
        self.sock = _DeadlineSocket(self._wrap(_connect(self._infos, self._deadline)), self._deadline)

    def _wrap(self, sock: socket.socket) -> socket.socket:
        return sock


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """The same over TLS: SNI and certificate verification use the hostname, never the address we connected to."""

    default_port = 443  # so the Host header leaves out :443

    def _wrap(self, sock: socket.socket) -> socket.socket:
        try:
            sock.settimeout(_remaining(self._deadline))  # the handshake as a whole gets this long
            return ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _size(n: int) -> str:
    return f"{n // 2**20} MB" if n >= 2**20 else f"{n:,} bytes"
