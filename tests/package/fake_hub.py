"""A small fake of the Hugging Face Hub HTTP API, served on 127.0.0.1, for tests of code that downloads models.

The real `huggingface_hub` client talks to it unmodified: pass `endpoint=hub.url` (snapshot_download, HfApi), or
set HF_ENDPOINT=hub.url *before* huggingface_hub is imported (it reads the variable once, in constants.py).
Written against huggingface_hub 2.4.0 (httpx2 client). Routes served (HEAD and GET):

    /api/models/{repo_id}[/revision/{rev}]         model_info / repo_info: JSON with `sha` and `siblings`
    /api/models/{repo_id}/tree/{rev}[/{path}]      list_repo_tree / list_repo_files (snapshot_download uses it)
    /{repo_id}/resolve/{rev}/{path}                file: ETag = quoted sha256, X-Repo-Commit, Range -> 206

No xet headers are ever sent (no X-Xet-Hash, no `xetHash` in the tree), so the client always takes the plain HTTP
path even with hf_xet installed. No LFS redirect either: files are served straight from /resolve.

What the client raises for each fault (huggingface_hub 2.4.0, checked with snapshot_download):
  unknown repo                  404 X-Error-Code: RepoNotFound     -> RepositoryNotFoundError
  unknown revision              404 X-Error-Code: RevisionNotFound -> RevisionNotFoundError
  require_token, no token       gated=True:  401 GatedRepo         -> GatedRepoError (a RepositoryNotFoundError)
                                gated=False: 401 RepoNotFound      -> RepositoryNotFoundError (status 401)
  require_token, wrong token    gated=True:  403 GatedRepo         -> GatedRepoError (status 403)
                                gated=False: 404 RepoNotFound      -> RepositoryNotFoundError (status 404)
  missing_files (listed, 404)   404 X-Error-Code: EntryNotFound    -> RemoteEntryNotFoundError
                                (subclass of both HfHubHTTPError and EntryNotFoundError)
  drop_after_bytes (one drop)   NOT an error: http_get catches the httpx2.RemoteProtocolError, sleeps 1 s and
                                re-requests in the same call with `Range: bytes=N-`, N = bytes it has written;
                                it writes in 10 MiB chunks, so a cut before 10 MiB re-requests the whole file (200)
                                and a later cut resumes with 206. A cut GET is logged with its 200/206 status.
  drop_repeat >= 6 (cut before 10 MiB each time) -> httpx2.RemoteProtocolError after 5 retries (~5 s of sleeps)
  HF_HUB_OFFLINE=1, empty cache -> LocalEntryNotFoundError (raised client side, no request is made)
  server stopped, empty cache   -> LocalEntryNotFoundError (cause: httpx2.ConnectError of the repo_info call)
A failed download leaves nothing behind: 2.4.0 downloads into a per-attempt `<etag>.<uuid>.incomplete` file that it
deletes on failure, so a *later* call never resumes; resuming only happens inside one call (see above).
Pass token=False (or a token) in tests: token=None sends HF_TOKEN / the saved token of the machine, if any.

    with FakeHub() as hub:
        sha = hub.add_repo("org/model", {"cpu/genai_config.json": b"{}"})
        snapshot_download("org/model", endpoint=hub.url, cache_dir=tmp, token=False)
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"  # "name" or "namespace/name"
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_TREE = re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_INFO = re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_DATE = "2024-01-01T00:00:00.000Z"


class _File:
    """One file of a commit, with the hashes the hub reports for it."""

    def __init__(self, data: bytes):
        self.data = data
        self.sha256 = hashlib.sha256(data).hexdigest()  # what the hub uses as ETag of LFS files
        self.blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id


class FakeHub:
    """Fake hub server. All attributes below may be changed at any time, also while a download runs."""

    def __init__(self, port: int = 0):
        self.url: str = ""                              # "http://127.0.0.1:PORT", set by start()
        self.requests: list[tuple[str, str, int]] = []  # (method, unquoted path without query, status)
        self.request_headers: list[dict[str, str]] = []  # headers of each logged request, same order
        self.errors: list[str] = []                      # exceptions raised inside the server (should stay empty)
        self.require_token: str | None = None  # if set, every repo needs "Authorization: Bearer <token>"
        self.gated: bool = True                 # with require_token: act as a gated repo (else as a private one)
        self.missing_files: set[str] = set()    # listed in siblings/tree, but HEAD/GET answer 404 EntryNotFound
        self.drop_after_bytes: dict[str, int] = {}  # path -> cut the connection after N body bytes of a GET
        self.drop_repeat: int = 1               # how many GETs of such a path are cut before its entry is removed
        self._port = port
        self._lock = threading.Lock()
        self._refs: dict[str, dict[str, str]] = {}                # repo -> {revision name: commit sha}
        self._commits: dict[str, dict[str, dict[str, _File]]] = {}  # repo -> {commit sha: {path: file}}
        self._drops_done: dict[str, int] = {}
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None

    # ---- content -------------------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes], revision: str = "main") -> str:
        """Make `revision` point at a new commit holding exactly `files`; return its 40-hex sha."""
        commit = {path.strip("/"): _File(bytes(data)) for path, data in files.items()}
        digest = hashlib.sha1(f"{repo_id}\0{revision}\0".encode())
        for path in sorted(commit):
            digest.update(f"{path}\0{commit[path].sha256}\0".encode())
        sha = digest.hexdigest()  # deterministic: same content -> same sha
        with self._lock:
            self._commits.setdefault(repo_id, {})[sha] = commit
            self._refs.setdefault(repo_id, {})[revision] = sha
        return sha

    def add_repo_from_dir(self, repo_id: str, folder_in_repo: str, local_dir: pathlib.Path,
                          revision: str = "main") -> str:
        """New commit = files already at `revision` (if any) + every file of local_dir under folder_in_repo/."""
        local_dir = pathlib.Path(local_dir)
        prefix = folder_in_repo.strip("/")
        files = {path: f.data for path, f in self._files_at(repo_id, revision).items()}
        for f in sorted(local_dir.rglob("*")):
            if f.is_file():
                rel = f.relative_to(local_dir).as_posix()
                files[f"{prefix}/{rel}" if prefix else rel] = f.read_bytes()
        return self.add_repo(repo_id, files, revision)

    def _files_at(self, repo_id: str, revision: str) -> dict[str, _File]:
        with self._lock:
            sha = self._refs.get(repo_id, {}).get(revision)
            return self._commits[repo_id][sha] if sha else {}

    # ---- server lifecycle ----------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._server = _Server(("127.0.0.1", self._port), handler)
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         name="fake-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:  # close kept-alive connections too, so a stopped hub really answers nothing
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()
            self.request_headers.clear()

    # ---- request handling (called from server threads) -------------------------------------------------------
    def _serve(self, h: _Handler, head: bool) -> int:
        split = urlsplit(h.path)
        raw = split.path
        kind, m = next(((k, m) for k, rx in (("resolve", _RESOLVE), ("tree", _TREE), ("info", _INFO))
                        if (m := rx.match(raw))), (None, None))
        if m is None:
            if raw == "/api/agent-harnesses":  # fetched once a day from HF_ENDPOINT by the user-agent code
                return h.send_json({"standardEnvVars": [], "harnesses": {}}, head)
            return h.error(404, None, "Not Found", head)
        repo, rev = unquote(m["repo"]), unquote(m["rev"] or "main")
        with self._lock:
            refs, commits = self._refs.get(repo), self._commits.get(repo, {})
            sha = None if refs is None else refs.get(rev) or (rev if rev in commits else None)
        if refs is None:
            return h.error(404, "RepoNotFound", "Repository not found", head)
        denied = self._auth_error(repo, h.headers.get("Authorization"))
        if denied:
            return h.error(*denied, head)
        if sha is None:
            return h.error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        files = commits[sha]
        if kind == "info":
            return h.send_json(self._info(repo, sha, files), head)
        if kind == "tree":
            recursive = parse_qs(split.query).get("recursive", ["false"])[0].lower() in ("true", "1")
            tree = self._tree(files, unquote(m["path"] or "").strip("/"), recursive)
            if tree is None:
                return h.error(404, "EntryNotFound", f"{m['path']} does not exist on \"{rev}\"", head)
            return h.send_json(tree, head)
        return self._resolve(h, head, sha, files, unquote(m["path"]))

    def _auth_error(self, repo: str, authorization: str | None) -> tuple[int, str, str] | None:
        token = self.require_token
        if token is None or authorization == f"Bearer {token}":
            return None
        if self.gated:
            if authorization is None:
                return 401, "GatedRepo", (f"Access to model {repo} is restricted. You must have access to it and "
                                          "be authenticated to access it. Please log in.")
            return 403, "GatedRepo", (f"Access to model {repo} is restricted and you are not in the authorized "
                                      "list.")
        return (401 if authorization is None else 404), "RepoNotFound", "Repository not found"

    def _info(self, repo: str, sha: str, files: dict[str, _File]) -> dict:
        gated = self.require_token is not None and self.gated
        return {"_id": sha[:24], "id": repo, "modelId": repo, "author": repo.split("/")[0] if "/" in repo else None,
                "sha": sha, "lastModified": _DATE, "createdAt": _DATE, "disabled": False,
                "private": self.require_token is not None and not self.gated, "gated": "manual" if gated else False,
                "downloads": 0, "likes": 0, "tags": [],
                "siblings": [{"rfilename": p, "size": len(f.data), "blobId": f.blob_id}
                             for p, f in sorted(files.items())]}

    @staticmethod
    def _tree(files: dict[str, _File], prefix: str, recursive: bool) -> list[dict] | None:
        entries, dirs = [], set()
        for path, f in sorted(files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            parts = (path[len(prefix) + 1:] if prefix else path).split("/")
            depth = len(parts) - 1 if recursive else min(1, len(parts) - 1)  # folders shown on the way
            dirs.update("/".join(([prefix] if prefix else []) + parts[:i]) for i in range(1, depth + 1))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "oid": f.blob_id, "size": len(f.data), "path": path})
        if prefix and not entries and not dirs:
            return None
        folders = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                   for d in sorted(dirs)]
        return folders + entries

    def _resolve(self, h: _Handler, head: bool, sha: str, files: dict[str, _File], path: str) -> int:
        f = files.get(path)
        if f is None or path in self.missing_files:
            return h.error(404, "EntryNotFound", f"{path} does not exist on \"{sha}\"", head, {"X-Repo-Commit": sha})
        size = len(f.data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{f.sha256}"', "X-Linked-Etag": f'"{f.sha256}"',
                   "X-Linked-Size": str(size), "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if head:
            return h.send(200, headers | {"Content-Length": str(size)}, b"", head=True)
        status, start, end = 200, 0, size
        if (rng := h.headers.get("Range")) is not None:
            m = _RANGE.match(rng.strip())
            if m and m[1]:
                start, end = int(m[1]), min(size, int(m[2]) + 1) if m[2] else size
            elif m and m[2]:
                start = max(0, size - int(m[2]))
            if not m or not (m[1] or m[2]) or start >= end:
                return h.send(416, {"Content-Range": f"bytes */{size}", "X-Repo-Commit": sha}, b"")
            status, headers["Content-Range"] = 206, f"bytes {start}-{end - 1}/{size}"
        with self._lock:  # one-shot (or drop_repeat-shot) connection cut
            cut = self.drop_after_bytes.get(path)
            if cut is not None:
                self._drops_done[path] = done = self._drops_done.get(path, 0) + 1
                if done >= self.drop_repeat:
                    del self.drop_after_bytes[path]
                    self._drops_done.pop(path)
        return h.send(status, headers, f.data[start:end], cut=cut)

    def _log(self, method: str, path: str, status: int, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append((method, unquote(urlsplit(path).path), status))
            self.request_headers.append(headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub

    def handle_error(self, request, client_address) -> None:  # keep test output clean, but remember
        import traceback
        self.hub.errors.append(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real hub; every response has a Content-Length
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms delayed-ACK stalls
    timeout = 30                    # idle kept-alive connections are closed after this
    hub: FakeHub

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._conns.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:  # the peer went away first
            pass

    def log_message(self, format, *args) -> None:  # silence the default stderr access log
        pass

    def do_GET(self) -> None:
        self._handle(head=False)

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def _handle(self, head: bool) -> None:
        status = self.hub._serve(self, head)
        self.hub._log(self.command, self.path, status, dict(self.headers.items()))

    def send(self, status: int, headers: dict[str, str], body: bytes, head: bool = False,
             cut: int | None = None) -> int:
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
        if cut is not None and not head:  # promised Content-Length bytes, sent fewer: the client sees a drop
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return status

    def send_json(self, obj, head: bool) -> int:
        return self.send(200, {"Content-Type": "application/json"}, json.dumps(obj).encode(), head)

    def error(self, status: int, code: str | None, message: str, head: bool,
              extra: dict[str, str] | None = None) -> int:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        return self.send(status, headers, json.dumps({"error": message}).encode(), head)
