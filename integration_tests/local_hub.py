"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1, for publish/load tests with the real clients.

huggingface_hub and transformers talk to it over real HTTP exactly as they talk to huggingface.co: repo
creation, commits with regular and LFS files (LFS batch → pre-signed PUT → verify), ``validate-yaml``, repo
info / tree / paths-info / refs, and ``resolve`` downloads with the headers the client requires
(``X-Repo-Commit``, ``ETag``, ``X-Linked-*``, ``X-Error-Code``). Mocks of ``HfApi`` would hide exactly the
failures users hit (auth, LFS negotiation, card validation), which is why the tests use this instead.

Only what the publisher and ``from_pretrained`` need is implemented (no PRs, no Xet, no search). Clients must
be started with ``HF_HUB_DISABLE_XET=1`` and ``HF_ENDPOINT`` set to :attr:`LocalHub.url` before
``huggingface_hub`` is imported (it caches both at import).

Auth follows the Hub: writes and private reads need ``Authorization: Bearer <token>``; a wrong token is
always a 401 with the Hub's message; ``validate-yaml`` and the signed LFS upload take no token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

BINARY_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
LFS_THRESHOLD = 10 * 2**20
USER = "tester"


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FileEntry:
    sha256: str
    size: int
    git_sha1: str
    lfs: bool


@dataclass
class Repo:
    private: bool
    commits: dict[str, dict[str, FileEntry]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class LocalHub:
    """The server: blobs on disk addressed by sha256, repos/refs/commits in memory.

    Usage: ``hub = LocalHub(tmp_dir, token="hf_test").start()`` → ``hub.url``; ``hub.stop()``.
    ``hub.requests`` records ``(method, path, has_auth)`` of every request, for tests that check what was sent.
    """

    def __init__(
        self, root: str | Path, token: str = "hf_test", port: int = 0, user: str = USER, orgs: tuple[str, ...] = ()
    ) -> None:
        self.root = Path(root)
        self.user = user  # the token's user name
        self.orgs = orgs  # organisations the token's user belongs to: with the user's own, the namespaces it writes
        self.port = port
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.secret = hashlib.sha256(token.encode() + b"sign").digest()
        self.requests: list[tuple[str, str, bool]] = []
        self.bodies: list[bytes] = []
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> LocalHub:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the hub first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- storage ---------------------------------------------------------------------------------------
    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.root / "blobs" / sha
        if not path.exists():
            path.write_bytes(data)
        return sha

    def blob(self, sha256: str) -> bytes:
        return (self.root / "blobs" / sha256).read_bytes()

    def has_blob(self, sha256: str) -> bool:
        return (self.root / "blobs" / sha256).exists()

    def sign(self, oid: str) -> str:
        return hmac.new(self.secret, oid.encode(), hashlib.sha256).hexdigest()

    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, FileEntry], title: str) -> str:
        seed = json.dumps([parent, sorted((p, e.sha256) for p, e in files.items()), title, time.time_ns()])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = files
        return sha

    def resolve(self, repo_id: str, rev: str, private_ok: bool) -> tuple[Repo, str]:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not private_ok):
            raise HubError(404, f"Repository Not Found for url: {repo_id}", "RepoNotFound")
        sha = repo.refs.get(rev, rev if rev in repo.commits else None)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo, sha


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: LocalHub

    def log_message(self, *args) -> None:  # quiet
        pass

    # -- plumbing --------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _auth(self) -> bool:
        """True with the right token, False without one; a wrong token is a 401 right away."""
        header = self.headers.get("Authorization", "")
        if not header:
            return False
        if header != f"Bearer {self.server_hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return True

    def _need_auth(self) -> None:
        if not self._auth():
            raise HubError(401, "Authentication required")

    def _dispatch(self) -> None:
        hub = self.server_hub
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        query = urllib.parse.parse_qs(url.query)
        hub.requests.append((self.command, path, bool(self.headers.get("Authorization"))))
        try:
            self._route(self.command, path, query)
        except HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            if isinstance(e, _EntryNotFound):
                headers["X-Repo-Commit"] = e.sha
            self._send(e.status, {"error": e.message}, headers)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _dispatch

    # -- routes ----------------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict) -> None:
        hub = self.server_hub
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/api/validate-yaml":
            body = json.loads(self._body() or b"{}")
            content = body.get("content", "")
            match = re.match(r"^\s*---\r?\n(.*?)\r?\n---\s*(\n|$)", content, re.S)  # the card's front matter
            try:
                meta = yaml.safe_load(match.group(1)) if match else {}
            except yaml.YAMLError as e:
                return self._send(400, {"errors": [{"message": f"Invalid YAML: {e}"}]})
            if not isinstance(meta, (dict, type(None))):
                return self._send(400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
            return self._send(200, {"errors": [], "warnings": []})
        if method == "PUT" and parts[0] == "_lfs":
            oid = parts[1]
            data = self._body()
            if not hmac.compare_digest(query.get("sig", [""])[0], hub.sign(oid)):
                raise HubError(403, "bad upload signature")
            if hashlib.sha256(data).hexdigest() != oid:
                raise HubError(400, "uploaded bytes do not match the oid")
            hub.put_blob(data)
            return self._send(200)
        if method == "POST" and parts[0] == "_lfs_verify":
            self._need_auth()
            info = json.loads(self._body())
            ok = hub.has_blob(info["oid"])
            return self._send(200 if ok else 404, {"message": "ok" if ok else "missing"})
        if path == "/api/whoami-v2":
            self._need_auth()
            me, orgs = self.server_hub.user, [{"name": o, "type": "org"} for o in self.server_hub.orgs]
            return self._send(200, {"type": "user", "name": me, "orgs": orgs, "auth": {"type": "access_token"}})
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(self._body()))
        if method == "DELETE" and path == "/api/repos/delete":
            self._need_auth()
            body = json.loads(self._body())
            repo_id = f"{body.get('organization') or self.server_hub.user}/{body['name']}"
            with hub.lock:
                if hub.repos.pop(repo_id, None) is None:
                    raise HubError(404, "Repository Not Found", "RepoNotFound")
            return self._send(200, {})
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._api_model(method, "/".join(parts[2:4]), parts[4:], query)
        if len(parts) >= 4 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        if len(parts) >= 5 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}")
        raise HubError(404, f"no route for {method} {path}")

    def _create(self, body: dict) -> None:
        hub = self.server_hub
        self._need_auth()
        if body.get("type", "model") not in (None, "model"):
            raise HubError(400, "this test hub serves model repos only")
        repo_id = f"{body.get('organization') or self.server_hub.user}/{body['name']}"
        if repo_id.split("/")[0] not in (self.server_hub.user, *self.server_hub.orgs):  # like the Hub
            owner = repo_id.split("/")[0]
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{owner}"')
        url = f"{hub.url}/{repo_id}"
        with hub.lock:
            if repo_id in hub.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            repo = Repo(private=bool(body.get("private")) or body.get("visibility") == "private")
            attrs = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            entry = FileEntry(hub.put_blob(attrs), len(attrs), _git_sha1(attrs), False)
            repo.refs["main"] = hub.new_commit(repo, None, {".gitattributes": entry}, "initial commit")
            hub.repos[repo_id] = repo
        return self._send(200, {"url": url, "name": repo_id})

    def _entry_json(self, path: str, e: FileEntry) -> dict:
        d = {"type": "file", "path": path, "size": e.size, "oid": e.git_sha1}
        if e.lfs:
            d["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": 134}
        return d

    def _api_model(self, method: str, repo_id: str, rest: list[str], query: dict) -> None:
        hub = self.server_hub
        authed = self._auth()
        if not rest or rest[0] == "revision":
            rev = urllib.parse.unquote(rest[1]) if rest else "main"
            repo, sha = hub.resolve(repo_id, rev, authed)
            files = repo.commits[sha]
            siblings = []
            for p, e in sorted(files.items()):
                s = {"rfilename": p}
                if query.get("blobs", ["false"])[0].lower() == "true":
                    s.update(size=e.size, blobId=e.git_sha1)
                    if e.lfs:
                        s["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": 134}
                siblings.append(s)
            info = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "siblings": siblings}
            if "README.md" in files:
                text = hub.blob(files["README.md"].sha256).decode()
                if text.startswith("---"):
                    info["cardData"] = yaml.safe_load(text.split("---")[1]) or {}
            return self._send(200, info)
        op = rest[0]
        if op == "tree":
            repo, sha = hub.resolve(repo_id, urllib.parse.unquote(rest[1]), authed)
            prefix = "/".join(rest[2:]).strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            files = repo.commits[sha]
            out, dirs = [], set()
            for p, e in sorted(files.items()):
                if prefix and not p.startswith(prefix + "/"):
                    continue
                sub = p[len(prefix) + 1 :] if prefix else p
                if "/" in sub and not recursive:
                    d = (prefix + "/" if prefix else "") + sub.split("/")[0]
                    if d not in dirs:
                        dirs.add(d)
                        out.append({"type": "directory", "path": d, "oid": sha})
                    continue
                out.append(self._entry_json(p, e))
            if prefix and not out:
                raise HubError(404, f"{prefix} does not exist", "EntryNotFound")
            return self._send(200, out)
        if op == "paths-info" and method == "POST":
            repo, sha = hub.resolve(repo_id, urllib.parse.unquote(rest[1]), authed)
            form = urllib.parse.parse_qs(self._body().decode())
            files = repo.commits[sha]
            return self._send(200, [self._entry_json(p, files[p]) for p in form.get("paths", []) if p in files])
        if op == "refs":
            repo, _ = hub.resolve(repo_id, "main", authed)
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in repo.refs.items()]
            return self._send(200, {"branches": branches, "tags": [], "converts": []})
        if op == "branch" and method == "POST":
            self._need_auth()
            repo, _ = hub.resolve(repo_id, "main", True)
            body = json.loads(self._body() or b"{}")
            name = urllib.parse.unquote("/".join(rest[1:]))
            if name in repo.refs:
                raise HubError(409, f"branch {name} already exists")
            repo.refs[name] = hub.resolve(repo_id, body.get("startingPoint") or "main", True)[1]
            return self._send(200, {})
        if op == "preupload" and method == "POST":
            self._need_auth()
            repo, sha = hub.resolve(repo_id, urllib.parse.unquote(rest[1]), True)
            out = []
            for f in json.loads(self._body())["files"]:
                sample = base64.b64decode(f.get("sample", ""))
                lfs = f["size"] >= LFS_THRESHOLD or b"\0" in sample or f["path"].endswith(BINARY_EXTENSIONS)
                known = repo.commits[sha].get(f["path"])
                oid = None if known is None else (known.sha256 if known.lfs else known.git_sha1)
                out.append(
                    {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
                )
            return self._send(200, {"files": out})
        if op == "commit" and method == "POST":
            self._need_auth()
            return self._commit(repo_id, urllib.parse.unquote("/".join(rest[1:])))
        raise HubError(404, f"no route for {method} /api/models/{repo_id}/{'/'.join(rest)}")

    def _lfs_batch(self, repo_id: str) -> None:
        hub = self.server_hub
        self._need_auth()
        hub.resolve(repo_id, "main", True)
        objects = []
        for o in json.loads(self._body())["objects"]:
            obj = {"oid": o["oid"], "size": o["size"]}
            if not hub.has_blob(o["oid"]):
                obj["actions"] = {
                    "upload": {"href": f"{hub.url}/_lfs/{o['oid']}?sig={hub.sign(o['oid'])}"},
                    "verify": {"href": f"{hub.url}/_lfs_verify/{o['oid']}"},
                }
            objects.append(obj)
        self._send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _commit(self, repo_id: str, rev: str) -> None:
        hub = self.server_hub
        lines = [json.loads(line) for line in self._body().decode().splitlines() if line.strip()]
        with hub.lock:
            repo, head = hub.resolve(repo_id, rev, True)
            header = next((x["value"] for x in lines if x["key"] == "header"), {})
            if header.get("parentCommit") and header["parentCommit"] != head:
                raise HubError(412, "parent commit is not the head of the branch")
            files = dict(repo.commits[head])
            for item in lines:
                key, v = item["key"], item["value"]
                if key == "file":
                    data = base64.b64decode(v["content"])
                    files[v["path"]] = FileEntry(hub.put_blob(data), len(data), _git_sha1(data), False)
                elif key == "lfsFile":
                    if not hub.has_blob(v["oid"]):
                        raise HubError(422, f"LFS object {v['oid']} of {v['path']} was never uploaded")
                    data = hub.blob(v["oid"])
                    files[v["path"]] = FileEntry(v["oid"], len(data), _git_sha1(data), True)
                elif key == "deletedFile":
                    files.pop(v["path"], None)
                elif key == "deletedFolder":
                    files = {p: e for p, e in files.items() if not p.startswith(v["path"].rstrip("/") + "/")}
            sha = hub.new_commit(repo, head, files, header.get("summary", ""))
            repo.refs[rev if rev in repo.refs else "main"] = sha
        self._send(200, {"commitOid": sha, "commitUrl": f"{hub.url}/{repo_id}/commit/{sha}"})

    def _resolve(self, repo_id: str, rev: str, file_path: str) -> None:
        hub = self.server_hub
        repo, sha = hub.resolve(repo_id, urllib.parse.unquote(rev), self._auth())
        entry = repo.commits[sha].get(file_path)
        if entry is None:
            raise _EntryNotFound(sha, file_path)
        data = hub.blob(entry.sha256)
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{entry.sha256 if entry.lfs else entry.git_sha1}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": entry.size})
        status = 200
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and self.command == "GET":
            start = int(rng[6:].split("-")[0] or 0)
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data, status = data[start:], 206
        if self.command == "HEAD":
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        self._send(status, data, headers)


class _EntryNotFound(HubError):
    """A missing file: the client needs the commit id too, to cache the miss."""

    def __init__(self, sha: str, path: str) -> None:
        super().__init__(404, f"Entry not found: {path}", "EntryNotFound")
        self.sha = sha


def main() -> None:
    """``python -m integration_tests.local_hub --root DIR --token T --port 8765``: serve until Ctrl-C (the README's
    offline publish walk-through points ``HF_ENDPOINT`` at it)."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="folder for the blobs")
    p.add_argument("--token", default="hf_local", help="the one token the server accepts")
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args()
    hub = LocalHub(args.root, token=args.token, port=args.port).start()
    print(f"serving a Hub-compatible endpoint at {hub.url} (user {hub.user!r}); Ctrl-C stops it", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
