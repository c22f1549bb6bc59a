"""A loopback HTTP server that answers the Hugging Face Hub's file endpoints, for
``huggingface_hub`` pointed at it through ``HF_ENDPOINT``; and a writer of the hub
cache layout (``models--org--name/{blobs,refs,snapshots}``) that huggingface_hub
documents. Nothing here can reach the real hub.

Endpoints (those huggingface_hub's ``model_info``, ``list_repo_tree`` and
``hf_hub_download`` call): ``GET /api/models/{repo}/revision/{rev}``,
``GET /api/models/{repo}/tree/{rev}``, ``HEAD|GET /{repo}/resolve/{rev}/{file}``. Errors
carry the ``X-Error-Code`` header the hub sends (RepoNotFound, RevisionNotFound,
EntryNotFound). Every request's method and path is recorded in ``requests``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes]  # path in the repo -> contents
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    refs: dict[str, str] = field(default_factory=lambda: {})  # branch/tag -> sha
    token: str | None = None  # private: needs "Authorization: Bearer <token>"

    def commit_for(self, rev: str) -> str | None:
        if rev == self.sha:
            return rev
        return {"main": self.sha, **self.refs}.get(rev)


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def downloaded(self) -> list[str]:
        """Repo files whose contents were sent (GET of a resolve URL)."""
        return [
            p.split("/resolve/", 1)[1].split("/", 1)[1]
            for m, p in self.requests
            if m == "GET" and "/resolve/" in p
        ]

    # ---- request handling ---------------------------------------------------------------

    def _find(self, parts: list[str]) -> tuple[str, Repo, list[str]] | None:
        # repo ids are "org/name": the first two path segments
        if len(parts) < 2:
            return None
        repo_id = "/".join(parts[:2])
        repo = self.repos.get(repo_id)
        return None if repo is None else (repo_id, repo, parts[2:])

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append(("HEAD" if head else "GET", path))
        parts = [p for p in path.split("/") if p]
        api = parts[:2] == ["api", "models"]
        found = self._find(parts[2:] if api else parts)
        if found is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found")
        repo_id, repo, rest = found
        if repo.token is not None and h.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._error(h, 401, "RepoNotFound", "Invalid credentials")
        if len(rest) < 2:
            return self._error(h, 404, "EntryNotFound", "no such endpoint")
        kind, rev, file_parts = rest[0], rest[1], rest[2:]
        sha = repo.commit_for(rev)
        if sha is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
        if api and kind == "revision":
            body = {
                "id": repo_id,
                "modelId": repo_id,
                "sha": sha,
                "private": repo.token is not None,
                "siblings": [{"rfilename": f} for f in sorted(repo.files)],
            }
            return self._json(h, body, sha)
        if api and kind == "tree":
            body_list = [
                {"type": "file", "path": f, "size": len(d), "oid": git_oid(d)}
                for f, d in sorted(repo.files.items())
            ]
            return self._json(h, body_list, sha)
        if not api and kind == "resolve":
            name = "/".join(file_parts)
            data = repo.files.get(name)
            if data is None:
                return self._error(h, 404, "EntryNotFound", f"{name} not found")
            h.send_response(200)
            h.send_header("Content-Type", "application/octet-stream")
            h.send_header("Content-Length", str(len(data)))
            h.send_header("ETag", f'"{git_oid(data)}"')
            h.send_header("X-Repo-Commit", sha)
            h.end_headers()
            if not head:
                h.wfile.write(data)
            return None
        return self._error(h, 404, "EntryNotFound", "no such endpoint")

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, body: object, sha: str) -> None:
        data = json.dumps(body).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.send_header("X-Repo-Commit", sha)
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)


def write_hub_cache(
    cache_dir: Path, repo_id: str, files: dict[str, bytes], sha: str, refs: dict[str, str]
) -> Path:
    """Lay out ``repo_id`` in a hub cache as huggingface_hub documents it: contents in
    ``blobs/<etag>``, ``snapshots/<sha>/<file>`` as relative symlinks to them, and
    ``refs/<branch or tag>`` holding the commit sha. Returns the snapshot folder."""
    root = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / sha
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = root / "blobs" / git_oid(data)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    for ref, ref_sha in refs.items():
        (root / "refs" / ref).write_text(ref_sha)
    return snapshot
