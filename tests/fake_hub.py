"""A local stand-in for the Hugging Face Hub, for tests: serves folders as model repositories at
the paths huggingface_hub requests — the model_info API (``/api/models/<id>/revision/<rev>``)
and ``/<id>/resolve/<rev>/<file>`` with the headers it checks (ETag, X-Repo-Commit,
Content-Length, X-Error-Code) — and records every request."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class FakeHub:
    """``repos``: model id → folder. ``requests``: (method, path) of every request served."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = repos
        self.commits = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in repos}
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def downloads(self) -> list[str]:
        """The files fetched (GET of resolve URLs), as repository paths."""
        return [path.split("/resolve/", 1)[1].split("/", 1)[1]
                for method, path in self.requests if method == "GET" and "/resolve/" in path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:  # noqa: N802
            self._serve(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(body=False)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path))
            if path.startswith("/api/models/"):
                self._model_info(path[len("/api/models/"):])
            elif "/resolve/" in path:
                self._resolve(path.lstrip("/"), body)
            else:
                self._error(404, "RepoNotFound")

        def _model_info(self, rest: str) -> None:
            repo, _, revision = rest.partition("/revision/")
            revision = revision or "main"
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound")
            if revision not in ("main", hub.commits[repo]):
                return self._error(404, "RevisionNotFound")
            data = {"id": repo, "modelId": repo, "sha": hub.commits[repo], "private": False,
                    "siblings": [{"rfilename": f} for f in hub.files(repo)]}
            self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

        def _resolve(self, rest: str, body: bool) -> None:
            repo, _, tail = rest.partition("/resolve/")
            revision, _, name = tail.partition("/")
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound")
            if revision not in ("main", hub.commits[repo]):
                return self._error(404, "RevisionNotFound")
            file = hub.repos[repo] / name
            commit = {"X-Repo-Commit": hub.commits[repo]}
            if not file.is_file():
                return self._error(404, "EntryNotFound", commit)
            data = file.read_bytes()
            headers = {**commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            self._send(200, data if body else b"", headers, length=len(data))

        def _error(self, status: int, code: str, headers: dict | None = None) -> None:
            self._send(status, json.dumps({"error": code}).encode(),
                       {"X-Error-Code": code, "X-Error-Message": code, **(headers or {})})

        def _send(self, status: int, data: bytes, headers: dict, length: int | None = None):
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data) if length is None else length))
            self.end_headers()
            if data:
                self.wfile.write(data)

    return Handler
