"""A small Hub-compatible HTTP server for the tests (stdlib only), bound to 127.0.0.1.

It implements the endpoints the unmodified `huggingface_hub` client uses to create a repository, commit files
(every file is declared "regular", so uploads travel base64 inside the NDJSON commit: no LFS or Xet), and download
them at any revision. Repository metadata lives in memory; blobs are written under `--storage`. No server on PyPI
implements the Hub's write API (see the project's testing notes), so the tests own this one.

Run: `python hub_server.py --storage DIR [--port 0] [--die-on-commit]`; it prints `PORT <n>` once it listens.
`--die-on-commit` makes the process exit while a commit is being received, to test an upload interrupted mid-way.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


USER = "testuser"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Store:
    """Repositories: `{(type, repo_id): {"commits": [commit, ...], "refs": {"main": sha}}}`, newest commit last."""

    def __init__(self, root: Path):
        self.root = root
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], dict] = {}
        self.lock = threading.Lock()

    def put_blob(self, data: bytes) -> str:
        sha = git_blob_sha1(data)
        path = self.root / "blobs" / sha
        if not path.exists():
            path.write_bytes(data)
        return sha

    def blob(self, sha: str) -> bytes:
        return (self.root / "blobs" / sha).read_bytes()

    def commit(self, key, files: dict[str, str], title: str, message: str = "") -> dict:
        repo = self.repos[key]
        parent = repo["commits"][-1]["id"] if repo["commits"] else ""
        stamp = f"{key}{parent}{title}{sorted(files.items())}{time.time_ns()}"
        commit = {
            "id": hashlib.sha1(stamp.encode()).hexdigest(),
            "files": files,
            "title": title,
            "message": message,
            "date": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        }
        repo["commits"].append(commit)
        repo["refs"]["main"] = commit["id"]
        return commit

    def resolve(self, key, revision: str) -> dict | None:
        repo = self.repos[key]
        sha = repo["refs"].get(revision, revision)
        return next((c for c in repo["commits"] if c["id"] == sha), None)


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hf-rmtkd-test-hub/1.0"

    def log_message(self, format, *args):  # keep the test output clean
        return

    # -- plumbing --------------------------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        return self.server.store

    def _body(self) -> bytes:
        # Always drain the body, even when answering an error: a keep-alive connection is corrupted otherwise.
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None) -> None:
        if body is None:
            body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if payload is not None else "application/octet-stream")
        for name, value in (headers or {}).items():
            self.send_header(name, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, **extra) -> None:
        self._send(status, {"error": message, **extra}, {"X-Error-Code": code, "X-Error-Message": message})

    def _repo(self, type_plural: str, repo_id: str):
        key = (REPO_TYPES.get(type_plural, "model"), repo_id)
        if key not in self.store.repos:
            self._error(401, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        return key

    def _revision(self, key, revision: str):
        commit = self.store.resolve(key, unquote(revision))
        if commit is None:
            self._error(404, "RevisionNotFound", f"Revision {revision} not found")
        return commit

    def _url(self, *parts: str) -> str:
        return f"http://{self.headers.get('Host')}/" + "/".join(parts)

    # -- dispatch --------------------------------------------------------------------------------------------
    ROUTES = [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("GET", r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/refs", "refs"),
        ("GET", r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/commits/([^/]+)", "commits"),
        ("GET", r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", "tree"),
        ("POST", r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/paths-info/([^/]+)", "paths_info"),
        ("POST", r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/preupload/([^/]+)", "preupload"),
        ("POST", r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/commit/([^/]+)", "commit"),
        ("GET", r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/revision/([^/]+))?", "info"),
        ("GET", r"/(datasets/|spaces/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", "resolve"),
    ]

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        method = "GET" if self.command == "HEAD" else self.command
        for verb, pattern, name in self.ROUTES:
            match = re.fullmatch(pattern, split.path)
            if verb == method and match:
                with self.store.lock:
                    getattr(self, "do_" + name)(*match.groups())
                return
        self._body()
        self._error(404, "EntryNotFound", f"No route for {self.command} {split.path}")

    do_GET = do_HEAD = do_POST = _dispatch

    # -- endpoints -------------------------------------------------------------------------------------------
    def do_whoami(self):
        self._send(200, {"type": "user", "name": USER, "orgs": [], "auth": {"accessToken": {"role": "write"}}})

    def do_validate_yaml(self):
        self._body()
        self._send(200, {})

    def do_create_repo(self):
        data = json.loads(self._body() or b"{}")
        repo_id = f"{data.get('organization') or USER}/{data['name']}"
        key = (data.get("type") or "model", repo_id)
        url = self._url(("" if key[0] == "model" else key[0] + "s/") + repo_id)
        if key in self.store.repos:
            # The Hub's 409 also carries the url: `create_repo(exist_ok=True)` reads it.
            self._error(409, "RepoExists", f"You already created this repo: {repo_id}", url=url)
            return
        self.store.repos[key] = {"commits": [], "refs": {}}
        self.store.commit(
            key, {".gitattributes": self.store.put_blob(b"*.safetensors filter=lfs\n")}, "initial commit"
        )
        self._send(200, {"url": url, "name": repo_id})

    def _entries(self, commit: dict, paths) -> list[dict]:
        return [
            {
                "type": "file",
                "path": path,
                "size": len(self.store.blob(commit["files"][path])),
                "oid": commit["files"][path],
            }
            for path in paths
            if path in commit["files"]
        ]

    def do_info(self, type_plural, repo_id, revision=None):
        key = self._repo(type_plural, repo_id)
        commit = key and self._revision(key, revision or "main")
        if commit:
            siblings = [
                {"rfilename": e["path"], "size": e["size"]} for e in self._entries(commit, sorted(commit["files"]))
            ]
            info = {"id": repo_id, "sha": commit["id"], "siblings": siblings, "private": False}
            info.update({"lastModified": commit["date"], "tags": [], "downloads": 0, "likes": 0})
            self._send(200, info)

    def do_refs(self, type_plural, repo_id):
        key = self._repo(type_plural, repo_id)
        if key:
            refs = self.store.repos[key]["refs"]
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in refs.items()]
            self._send(200, {"branches": branches, "tags": [], "converts": []})

    def do_commits(self, type_plural, repo_id, revision):
        key = self._repo(type_plural, repo_id)
        head = key and self._revision(key, revision)
        if head:
            commits = self.store.repos[key]["commits"]
            history = commits[: commits.index(head) + 1][::-1]
            authors = [{"user": USER}]
            self._send(
                200,
                [
                    {
                        "id": c["id"],
                        "title": c["title"],
                        "message": c["message"],
                        "authors": authors,
                        "date": c["date"],
                    }
                    for c in history
                ],
            )

    def do_tree(self, type_plural, repo_id, revision, folder=None):
        key = self._repo(type_plural, repo_id)
        commit = key and self._revision(key, revision)
        if commit:
            folder = unquote(folder or "").strip("/")
            recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
            paths = [p for p in sorted(commit["files"]) if not folder or p.startswith(folder + "/")]
            if not recursive:
                depth = folder.count("/") + 1 if folder else 0
                paths = [p for p in paths if p.count("/") == depth]
            self._send(200, self._entries(commit, paths))

    def do_paths_info(self, type_plural, repo_id, revision):
        raw = self._body()
        key = self._repo(type_plural, repo_id)
        commit = key and self._revision(key, revision)
        if commit:
            if self.headers.get("Content-Type", "").startswith("application/json"):
                paths = json.loads(raw).get("paths", [])
            else:
                paths = parse_qs(raw.decode()).get("paths", [])
            self._send(200, self._entries(commit, paths))

    def do_preupload(self, type_plural, repo_id, revision):
        data = json.loads(self._body() or b"{}")
        key = self._repo(type_plural, repo_id)
        commit = key and self._revision(key, revision)
        if commit:
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": commit["files"].get(f["path"]),
                }
                for f in data.get("files", [])
            ]
            self._send(200, {"files": files, "commitOid": commit["id"]})

    def do_commit(self, type_plural, repo_id, revision):
        raw = self._body()
        if self.server.die_on_commit:
            # Simulates a server lost mid-upload: no reply, the connection drops.
            os._exit(3)
        key = self._repo(type_plural, repo_id)
        head = key and self._revision(key, revision)
        if not head:
            return
        files, title, message = dict(head["files"]), "", ""
        for line in raw.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                title, message = value.get("summary", ""), value.get("description", "")
            elif item["key"] == "file":
                files[value["path"]] = self.store.put_blob(base64.b64decode(value["content"]))
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
            elif item["key"] == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: s for p, s in files.items() if not p.startswith(folder)}
            else:
                self._error(400, "BadRequest", f"Unsupported commit operation {item['key']!r} (no LFS here)")
                return
        commit = self.store.commit(key, files, title, message)
        url = self._url(repo_id, "commit", commit["id"])
        self._send(200, {"commitOid": commit["id"], "commitUrl": url, "pullRequestUrl": None})

    def do_resolve(self, type_prefix, repo_id, revision, path):
        type_plural = (type_prefix or "models/").rstrip("/")
        key = self._repo(type_plural, repo_id)
        commit = key and self._revision(key, revision)
        if not commit:
            return
        path = unquote(path)
        if path not in commit["files"]:
            self._error(404, "EntryNotFound", f"{path} does not exist at revision {revision}")
            return
        data = self.store.blob(commit["files"][path])
        headers = {"X-Repo-Commit": commit["id"], "ETag": f'"{commit["files"][path]}"', "Accept-Ranges": "bytes"}
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and self.command == "GET":
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, headers=headers, body=data[start : end + 1])
        else:
            self._send(200, headers=headers, body=data)


class RunningServer:
    """A server process started by `start_server`; `url` is its endpoint, `stop()` ends it."""

    def __init__(self, process: subprocess.Popen, port: int):
        self.process = process
        self.url = f"http://127.0.0.1:{port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_server(storage: Path, die_on_commit: bool = False, timeout: float = 30.0) -> RunningServer:
    """Start this server in a subprocess on a free port and wait until it answers."""
    command = [sys.executable, __file__, "--storage", str(storage)] + (["--die-on-commit"] if die_on_commit else [])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line.startswith("PORT "):
        process.kill()
        raise RuntimeError(f"The test Hub server did not start (it printed {line!r}).")
    server = RunningServer(process, int(line.split()[1]))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(server.url + "/api/whoami-v2", timeout=2) as reply:
                if reply.status == 200:
                    return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--die-on-commit", action="store_true")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), HubHandler)
    server.daemon_threads = True
    server.store = Store(args.storage)
    server.die_on_commit = args.die_on_commit
    print(f"PORT {server.server_address[1]}", flush=True)
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
