"""A loopback fake of the Hugging Face Hub, spoken to by the real ``huggingface_hub`` client (2.x, httpx2 based).

``FakeHub`` is a stdlib ``ThreadingHTTPServer`` on ``127.0.0.1`` (free port, background thread) that keeps repos in
memory and answers exactly the endpoints the client uses for: create_repo, create_branch, upload_folder /
upload_file / create_commit (preupload + NDJSON commit), model_info / repo_info, list_repo_files / list_repo_tree,
list_repo_refs, whoami, hf_hub_download / snapshot_download (HEAD + GET on ``/resolve/``) and ModelCard.load /
ModelCard.push_to_hub (``/api/validate-yaml`` + commit).

Endpoints (``{T}`` is ``models``, ``datasets`` or ``spaces``; ``{repo}`` is ``namespace/name``)::

    POST   /api/repos/create                       -> {"url", "name", "id"}; 409 if it exists
    POST   /api/validate-yaml                      -> 200 {"errors": [], "warnings": []}; 400 on bad YAML
    GET    /api/whoami-v2                          -> the fake user
    GET    /api/{T}/{repo}[/revision/{rev}]        -> repo info (id, sha, private, siblings, cardData, ...)
    GET    /api/{T}/{repo}/tree/{rev}[/{path}]     -> [{"type": "file"|"directory", "path", "size", "oid"}]
    GET    /api/{T}/{repo}/refs                    -> {"branches", "tags", "converts"}
    POST   /api/{T}/{repo}/branch/{branch}         -> 200; 409 if it exists ({"startingPoint"} honoured)
    DELETE /api/{T}/{repo}/branch/{branch}         -> 200
    POST   /api/{T}/{repo}/preupload/{rev}         -> every file "regular" (never LFS/Xet), with the remote oid
    POST   /api/{T}/{repo}/commit/{rev}            -> NDJSON header/file/deletedFile/deletedFolder; {"commitOid"}
    HEAD   /[datasets/|spaces/]{repo}/resolve/{rev}/{path}  -> X-Repo-Commit, ETag (git blob sha1), Content-Length
    GET    same                                    -> the bytes (single ``Range: bytes=a-b`` honoured)

Errors carry ``X-Error-Code`` like the Hub, so the client raises its own typed errors: unknown repo (or a private
repo asked for without a token) -> ``RepositoryNotFoundError``; unknown branch/commit -> ``RevisionNotFoundError``;
unknown file -> ``RemoteEntryNotFoundError`` (``EntryNotFoundError``); injected failures -> HTTP 500
(``HfHubHTTPError`` once the client's own retries are spent).

Why every file is "regular": ``hf_xet`` is installed, so any file the server marked "lfs" would go through the Xet
protocol (a CAS server we do not fake) — or, with ``HF_HUB_DISABLE_XET=1``, through the LFS batch API. The upload
mode is decided by the server's ``preupload`` answer, never insisted on by the client (even ``.safetensors`` of
several MB), so answering "regular" makes every byte travel base64-encoded inside the commit NDJSON and no LFS/Xet
endpoint is needed. A commit carrying an ``lfsFile`` line is refused with 400.

Pointing an already-imported client at the fake (what ``fake_hub_endpoint`` does, and why):

* ``HF_ENDPOINT`` is read once, at import, into ``huggingface_hub.constants.ENDPOINT``; setting the env var later
  changes nothing in-process. Patch ``constants.ENDPOINT`` (read at call time by ``HfApi()``, repocard's
  validate-yaml, ``_commit_api``), ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (the resolve URL used by
  ``hf_hub_download``/``hf_hub_url`` when no ``endpoint=`` is passed) and ``huggingface_hub.hf_api.api.endpoint``
  (the module-level ``HfApi`` behind ``huggingface_hub.upload_file``, ``model_info``... which ModelCard.push_to_hub
  uses). ``HfApi`` instances copy the endpoint at ``__init__``: make them inside the context, or pass
  ``HfApi(endpoint=hub.url)``. transformers keeps one such instance (``transformers.utils.hub._hf_api``, made at
  its first Hub call and used by ``from_pretrained`` to resolve a revision): the fixture empties it, so one made
  inside the context points at this hub and not at an earlier, stopped one.
* ``constants.HF_HUB_OFFLINE`` (tests/conftest.py sets ``HF_HUB_OFFLINE=1`` before import) must be ``False`` or every
  request raises ``OfflineModeIsEnabled``; transformers' ``is_offline_mode`` reads the same constant.
* ``constants.HF_HUB_DISABLE_TELEMETRY`` is import-time too: while False, building headers fetches
  ``{ENDPOINT}/api/agent-harnesses`` (and caches it under HF_HOME), so the fixture forces it True.
* ``constants.HF_URL_HOSTS`` and ``utils._http._HUB_ORIGINS`` (import-time copies of the endpoint's host) get the
  fake's host; ``constants.HF_HUB_CACHE`` (default ``cache_dir``) can be redirected with ``cache_dir=``.
* ``HF_TOKEN`` (read at call time) is set to a dummy token so calls without ``token=`` authenticate; ``HF_ENDPOINT``
  and ``HF_HUB_OFFLINE=0`` are exported too, for subprocesses that import the client afresh.
* The shared ``httpx2.Client`` is closed on enter and exit so no pooled connection outlives a server.
* Not patched (no call here uses them): ``utils._git_credential.ENDPOINT`` and ``cli.auth.ENDPOINT``.

Retries in the client (``utils._http.http_backoff``): up to 5 retries (6 attempts) waiting 1, 2, 4, 8, 8 s on HTTP
408/429/500/502/503/504 and on timeouts / network errors (connection refused included). Used by: preupload, tree
listing (list_repo_files, snapshot_download), the commit POST of upload_folder when ``hf_xet`` is installed (its
pipelined uploader passes ``retry_on_error=True``), and the second metadata HEAD of hf_hub_download (the first HEAD
has no retries; on 5xx/connection error with nothing cached it HEADs again with retries: 7 attempts in all). NOT
retried: create_repo, create_branch, model_info/repo_info, validate-yaml, and the commit POST of create_commit /
upload_file / ModelCard.push_to_hub / upload_folder without hf_xet. The file GET retries only 408/429 (a 5xx fails at
once); a dropped connection resumes up to 5 times with ``time.sleep(1)`` in ``file_download`` (not patched). With
``fast_retries=True`` (the default) the fixture swaps the ``time`` module seen by ``utils._http`` for one whose
``sleep`` returns at once: same number of attempts, no waiting. So to surface a 500 as ``HfHubHTTPError`` set
``fail_next=6`` for a retried call (e.g. ``fail_match="/preupload/"``) and ``fail_next=1`` for a non-retried one.
Two twists: hf_hub_download reports a failed HEAD (nothing cached) as ``LocalEntryNotFoundError`` whose
``__cause__`` is the ``HfHubHTTPError``; and the hf_xet upload pipeline, when a commit of more than 20 files still
fails after its retries, tries again with ever smaller batches (6 attempts each) down to 20 files, so it sends many
more ``/commit/`` requests and may land several commits.

Differences from the real Hub worth knowing: a new repo has an empty tree (the Hub seeds ``.gitattributes``); repo
ids must be ``namespace/name`` and are unique across repo types; any bearer token is accepted; no pull requests
(``create_pr`` -> 400), tags, LFS/Xet, ``.gitignore`` handling or pagination.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

REPO_TYPE_PREFIXES = {"models": "model", "datasets": "dataset", "spaces": "space"}
Answer = tuple[int, dict[str, str], bytes]  # status, headers, body
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


class HubError(Exception):
    """An HTTP error answer, shaped like the Hub's (``X-Error-Code`` decides which client error is raised)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of ``data``: what the Hub reports as a regular file's oid/ETag and the client compares to."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class FakeHub:
    """A loopback Hub. Repos live in memory: {repo_id: {revision: {path: bytes}}}, with commit ids.

    Guarantees: every request is logged in ``requests`` as (method, path as sent: URL-encoded, no query string), in
    arrival order, injected failures included; state changes are atomic (a failed or refused commit changes
    nothing); after ``stop()`` the port refuses connections and no pooled keep-alive connection is still served.
    Treat ``repos``/``heads``/``snapshots`` as read-only (use ``commit()`` to seed): commit ids index the snapshots.
    """

    def __init__(self, user: str = "fake-user") -> None:
        self.user = user
        self.url = ""
        # repo_id -> branch -> path -> bytes (branch heads; what tests usually inspect)
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        # repo_id -> branch -> commit sha
        self.heads: dict[str, dict[str, str]] = {}
        # repo_id -> commit sha -> files at that commit (immutable, so commit-hash revisions resolve)
        self.snapshots: dict[str, dict[str, dict[str, bytes]]] = {}
        # repo_id -> {"type", "private", "created_at", "last_modified"}
        self.meta: dict[str, dict[str, Any]] = {}
        # one entry per accepted commit: {"repo_id", "branch", "oid", "parent", "message"}
        self.commits: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        self.fail_next = 0
        self.fail_match: str | None = None
        self.fail_status = 500
        # server-side exceptions (bugs in the fake), answered as 500; tests can assert it stays empty
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._salt = uuid.uuid4().hex  # distinct hubs never share commit ids (client caches are keyed by them)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeHub:
        """Bind 127.0.0.1 on a free port and serve in a daemon thread; ``url`` is set on return."""
        if self._server is not None:
            raise RuntimeError("FakeHub already started")
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        # a short poll interval: shutdown() waits up to one interval, and tests stop many hubs
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: the listening socket is closed (connections refused) and open keep-alive ones are cut."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        # The client pools keep-alive connections whose handler threads outlive shutdown(): cut them too.
        with server.conn_lock:
            conns = list(server.conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """A copy of the files of ``repo_id`` at a branch or commit sha; KeyError if either is unknown."""
        with self._lock:
            if repo_id not in self.meta:
                raise KeyError(repo_id)
            sha = self._resolve(repo_id, revision)
            if sha is None:
                raise KeyError(f"{repo_id}@{revision}")
            return dict(self.snapshots[repo_id][sha])

    def head(self, repo_id: str, branch: str = "main") -> str:
        """The commit sha at the head of ``branch``."""
        with self._lock:
            return self.heads[repo_id][branch]

    def commit(
        self, repo_id: str, files: dict[str, bytes], branch: str = "main", message: str = "seed", private: bool = False
    ) -> str:
        """Seed without HTTP: create the repo/branch if missing, add ``files`` on ``branch``; returns the commit sha."""
        namespace, _, name = repo_id.partition("/")
        with self._lock:
            if repo_id not in self.meta:
                self._create_repo({"name": name, "organization": namespace, "private": private})
            if branch not in self.heads[repo_id]:
                self._branch("POST", repo_id, branch, {})
            return self._new_commit(repo_id, branch, {**self.repos[repo_id][branch], **files}, message)

    # ------------------------------------------------------------------ state helpers (caller holds the lock)

    def _resolve(self, repo_id: str, revision: str) -> str | None:
        heads = self.heads[repo_id]
        if revision in heads:
            return heads[revision]
        if 7 <= len(revision) <= 40:
            matches = [sha for sha in self.snapshots[repo_id] if sha.startswith(revision.lower())]
            if len(matches) == 1:
                return matches[0]
        return None

    def _new_commit(self, repo_id: str, branch: str, files: dict[str, bytes], message: str) -> str:
        parent = self.heads[repo_id].get(branch)
        digest = hashlib.sha1(f"{self._salt}\0{len(self.commits)}\0{repo_id}\0{branch}\0{parent}\0{message}".encode())
        for path in sorted(files):
            digest.update(f"\0{path}\0{git_blob_oid(files[path])}".encode())
        sha = digest.hexdigest()
        self.snapshots[repo_id][sha] = dict(files)
        self.heads[repo_id][branch] = sha
        self.repos[repo_id][branch] = dict(files)
        self.meta[repo_id]["last_modified"] = _now()
        self.commits.append({"repo_id": repo_id, "branch": branch, "oid": sha, "parent": parent, "message": message})
        return sha

    def _repo_url(self, repo_id: str) -> str:
        return f"{self.url}/{_URL_PREFIX[self.meta[repo_id]['type']]}{repo_id}"

    def _check_repo(self, repo_id: str, authorized: bool) -> None:
        # The Hub answers 404 RepoNotFound for private repos the caller may not see, too.
        if repo_id not in self.meta or (self.meta[repo_id]["private"] and not authorized):
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")

    def _check_revision(self, repo_id: str, revision: str) -> str:
        sha = self._resolve(repo_id, revision)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    def _check_branch(self, repo_id: str, branch: str) -> None:
        # Commits (and preupload) only go to branches, as on the Hub.
        if branch not in self.heads[repo_id]:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")

    def _take_failure(self, path: str) -> bool:
        with self._lock:
            if self.fail_next > 0 and (self.fail_match is None or self.fail_match in path):
                self.fail_next -= 1
                return True
            return False

    # ------------------------------------------------------------------ endpoints

    def handle(self, method: str, raw_path: str, query: dict[str, list[str]], body: bytes, authorized: bool) -> Answer:
        """Route one request; returns (status, headers, body bytes) or raises HubError."""
        parts = [p for p in raw_path.split("/") if p]
        with self._lock:
            if parts[:1] == ["api"]:
                return self._api(method, parts[1:], query, body, authorized)
            return self._resolve_file(method, parts, authorized)

    def _api(
        self, method: str, parts: list[str], query: dict[str, list[str]], body: bytes, authorized: bool
    ) -> Answer:
        if method == "POST" and parts == ["repos", "create"]:
            return self._create_repo(_json(body))
        if method == "POST" and parts == ["validate-yaml"]:
            return self._validate_yaml(_json(body))
        if method == "GET" and parts == ["whoami-v2"]:
            if not authorized:
                raise HubError(401, "Invalid credentials in Authorization header")
            return _ok({"type": "user", "name": self.user, "fullname": self.user, "orgs": [], "auth": {}})
        if len(parts) < 3 or parts[0] not in REPO_TYPE_PREFIXES:
            raise HubError(404, f"FakeHub has no route for {method} /api/{'/'.join(parts)}")
        repo_id = f"{unquote(parts[1])}/{unquote(parts[2])}"
        rest = [unquote(p) for p in parts[3:]]
        self._check_repo(repo_id, authorized)
        if method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
            return self._info(repo_id, rest[1] if rest else "main")
        if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._tree(repo_id, rest[1], "/".join(rest[2:]).strip("/"), recursive)
        if method == "GET" and rest == ["refs"]:
            branches = [
                {"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in self.heads[repo_id].items()
            ]
            return _ok({"branches": branches, "tags": [], "converts": []})
        if len(rest) == 2 and rest[0] == "branch" and method in ("POST", "DELETE"):
            return self._branch(method, repo_id, rest[1], _json(body) if body else {})
        if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            return self._preupload(repo_id, rest[1], _json(body))
        if method == "POST" and len(rest) == 2 and rest[0] == "commit":
            if query.get("create_pr", ["0"])[0] == "1":
                raise HubError(400, "FakeHub does not support pull requests (create_pr)")
            return self._commit_ndjson(repo_id, rest[1], body)
        raise HubError(404, f"FakeHub has no route for {method} /api/{'/'.join(parts)}")

    def _create_repo(self, payload: dict) -> Answer:
        name, org = payload.get("name"), payload.get("organization")
        if not name:
            raise HubError(400, "Missing repo name")
        repo_id = f"{org or self.user}/{name}"
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"FakeHub does not support repo type {repo_type!r}")
        if repo_id in self.meta:
            # the client reads "url" from this 409 when exist_ok=True
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": self._repo_url(repo_id)})
        private = payload.get("visibility") == "private" or payload.get("private") is True
        self.meta[repo_id] = {"type": repo_type, "private": private, "created_at": _now(), "last_modified": _now()}
        self.repos[repo_id], self.heads[repo_id], self.snapshots[repo_id] = {}, {}, {}
        self._new_commit(repo_id, "main", {}, "initial commit")
        return _ok({"url": self._repo_url(repo_id), "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict) -> Answer:
        import yaml  # a project dependency; imported here so importing this module stays cheap

        content = str(payload.get("content", ""))
        front = _front_matter(content)
        if front is not None:
            try:
                data = yaml.safe_load(front)
            except yaml.YAMLError as err:
                return 400, {}, _dumps({"errors": [{"message": f"Invalid YAML: {err}"}], "warnings": []})
            if data is not None and not isinstance(data, dict):
                return 400, {}, _dumps({"errors": [{"message": "Metadata must be a YAML mapping"}], "warnings": []})
        return _ok({"errors": [], "warnings": []})

    def _info(self, repo_id: str, revision: str) -> Answer:
        sha = self._check_revision(repo_id, revision)
        files, meta = self.snapshots[repo_id][sha], self.meta[repo_id]
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "private": meta["private"],
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "createdAt": meta["created_at"],
            "lastModified": meta["last_modified"],
            "siblings": [{"rfilename": path} for path in sorted(files)],
        }
        if meta["type"] == "model":
            info["modelId"] = repo_id
        card = _card_data(files.get("README.md"))
        if card is not None:
            info["cardData"] = card
        return _ok(info)

    def _tree(self, repo_id: str, revision: str, path: str, recursive: bool) -> Answer:
        files = self.snapshots[repo_id][self._check_revision(repo_id, revision)]
        prefix = f"{path}/" if path else ""
        entries: dict[str, dict] = {}
        for file_path in sorted(files):
            if not file_path.startswith(prefix):
                continue
            segments = file_path[len(prefix) :].split("/")
            dirs = range(1, len(segments)) if recursive else range(1, min(len(segments), 2))
            for depth in dirs:
                folder = prefix + "/".join(segments[:depth])
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": _tree_oid(files, folder)})
            if recursive or len(segments) == 1:
                data = files[file_path]
                entries[file_path] = {"type": "file", "path": file_path, "size": len(data), "oid": git_blob_oid(data)}
        if path and not entries:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        return _ok(list(entries.values()))

    def _branch(self, method: str, repo_id: str, branch: str, payload: dict) -> Answer:
        heads = self.heads[repo_id]
        if method == "DELETE":
            if branch not in heads:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if branch == "main":
                raise HubError(403, "Cannot delete the default branch")
            del heads[branch], self.repos[repo_id][branch]
            return _ok({})
        if branch in heads:
            raise HubError(409, "Reference already exists")
        sha = self._check_revision(repo_id, payload.get("startingPoint") or "main")
        heads[branch] = sha
        self.repos[repo_id][branch] = dict(self.snapshots[repo_id][sha])
        return _ok({})

    def _preupload(self, repo_id: str, branch: str, payload: dict) -> Answer:
        self._check_branch(repo_id, branch)
        current = self.repos[repo_id][branch]
        answers = [
            {
                "path": entry["path"],
                "uploadMode": "regular",  # content inline in the commit: no LFS/Xet transfer (see module docstring)
                "shouldIgnore": False,
                "oid": git_blob_oid(current[entry["path"]]) if entry["path"] in current else None,
            }
            for entry in payload.get("files", [])
        ]
        return _ok({"files": answers, "commitOid": self.heads[repo_id][branch]})

    def _commit_ndjson(self, repo_id: str, branch: str, body: bytes) -> Answer:
        self._check_branch(repo_id, branch)
        files = dict(self.repos[repo_id][branch])  # work on a copy: a refused commit changes nothing
        header: dict = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                content = value.get("content", "")
                encoding = value.get("encoding", "base64")
                files[_clean_path(value["path"])] = (
                    base64.b64decode(content) if encoding == "base64" else content.encode("utf-8")
                )
            elif key == "deletedFile":
                path = _clean_path(value["path"])
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                folder = _clean_path(value["path"]).rstrip("/") + "/"
                for path in [p for p in files if p.startswith(folder)]:
                    del files[path]
            elif key == "lfsFile":
                raise HubError(400, "FakeHub does not store LFS files (preupload always answers 'regular')")
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        parent = header.get("parentCommit")
        if parent and not self.heads[repo_id][branch].startswith(parent):
            raise HubError(412, f"Parent commit {parent} is not the head of {branch}")
        sha = self._new_commit(repo_id, branch, files, str(header.get("summary", "")))
        commit_url = f"{self._repo_url(repo_id)}/commit/{sha}"
        return _ok({"success": True, "commitOid": sha, "commitUrl": commit_url, "pullRequestUrl": None})

    def _resolve_file(self, method: str, parts: list[str], authorized: bool) -> Answer:
        if method not in ("GET", "HEAD"):
            raise HubError(405, f"Method {method} not allowed")
        offset = 1 if parts[:1] and parts[0] in REPO_TYPE_PREFIXES else 0
        if len(parts) < offset + 5 or parts[offset + 2] != "resolve":
            raise HubError(404, f"FakeHub has no route for {method} /{'/'.join(parts)}")
        repo_id = f"{unquote(parts[offset])}/{unquote(parts[offset + 1])}"
        revision = unquote(parts[offset + 3])
        path = "/".join(unquote(p) for p in parts[offset + 4 :])
        self._check_repo(repo_id, authorized)
        sha = self._check_revision(repo_id, revision)
        files = self.snapshots[repo_id][sha]
        if path not in files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        data = files[path]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{git_blob_oid(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        return 200, headers, data


def _ok(payload: Any) -> Answer:
    return 200, {}, _dumps(payload)


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def _json(body: bytes) -> Any:
    try:
        return json.loads(body or b"{}")
    except json.JSONDecodeError as err:
        raise HubError(400, f"Invalid JSON body: {err}") from err


def _clean_path(path: str) -> str:
    if not path or path.startswith("/") or ".." in path.split("/"):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _tree_oid(files: dict[str, bytes], folder: str) -> str:
    digest = hashlib.sha1(folder.encode())
    for path in sorted(p for p in files if p.startswith(folder + "/")):
        digest.update(f"{path}\0{git_blob_oid(files[path])}".encode())
    return digest.hexdigest()


def _front_matter(content: str) -> str | None:
    """The YAML block between leading ``---`` lines of a card, or None if there is none."""
    lines = content.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for index, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            return "\n".join(lines[1:index])
    return None


def _card_data(readme: bytes | None) -> dict | None:
    if readme is None:
        return None
    front = _front_matter(readme.decode("utf-8", errors="replace"))
    if front is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(front)
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, hub: FakeHub) -> None:
        self.hub = hub
        self.conns: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer carries Content-Length
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.conn_lock:
            self.server.conns.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.conn_lock:
                self.server.conns.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean; the hub's ``requests`` list is the log

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # skip trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        body = self._read_body()  # always drain the body, or the next request on this connection is garbage
        raw_path, _, raw_query = self.path.partition("?")
        with hub._lock:
            hub.requests.append((method, raw_path))
        if hub._take_failure(raw_path):
            self._send(hub.fail_status, {}, _dumps({"error": "FakeHub: injected failure"}), method)
            return
        authorization = self.headers.get("Authorization", "")
        authorized = authorization.lower().startswith("bearer ") and len(authorization) > len("bearer ")
        try:
            status, headers, payload = hub.handle(method, raw_path, parse_qs(raw_query), body, authorized)
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code is not None:
                headers["X-Error-Code"] = err.code
            self._send(err.status, headers, _dumps({"error": err.message, **err.extra}), method)
            return
        except Exception as err:  # a bug in the fake: answer 500 and keep it for the tests to see
            hub.errors.append(f"{method} {raw_path}: {type(err).__name__}: {err}")
            self._send(500, {}, _dumps({"error": f"FakeHub internal error: {err}"}), method)
            return
        if method == "GET" and status == 200 and "X-Repo-Commit" in headers:
            status, headers, payload = _apply_range(self.headers.get("Range"), headers, payload)
        self._send(status, headers, payload, method)

    def _send(self, status: int, headers: dict[str, str], payload: bytes, method: str) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)


def _apply_range(range_header: str | None, headers: dict[str, str], data: bytes) -> Answer:
    """Honour a single ``bytes=start-[end]`` range (used by the client to resume); anything else gets the whole file."""
    if not range_header or not range_header.startswith("bytes=") or "," in range_header:
        return 200, headers, data
    start_text, _, end_text = range_header[len("bytes=") :].partition("-")
    if not start_text.isdigit() or (end_text and not end_text.isdigit()):
        return 200, headers, data
    start, end = int(start_text), int(end_text) if end_text else len(data) - 1
    if start >= len(data):
        return 416, {**headers, "Content-Range": f"bytes */{len(data)}"}, b""
    end = min(end, len(data) - 1)
    return 206, {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}, data[start : end + 1]


class _InstantTime:
    """Stands in for the ``time`` module inside ``huggingface_hub.utils._http``: real clock, ``sleep`` is a no-op."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        """Return at once, so the client's retry backoff (1+2+4+8+8 s) costs nothing in tests."""


_MISSING = object()


@contextmanager
def fake_hub_endpoint(
    hub: FakeHub,
    *,
    token: str | None = "hf_fake",
    cache_dir: str | os.PathLike | None = None,
    fast_retries: bool = True,
) -> Iterator[FakeHub]:
    """Point the already-imported ``huggingface_hub`` at ``hub.url`` for the duration; everything is restored after.

    ``token`` goes to ``HF_TOKEN`` (None leaves it alone); ``cache_dir`` becomes the default hub cache
    (``constants.HF_HUB_CACHE``); ``fast_retries`` makes the client's retry backoff instant. See the module docstring
    for why each patch is needed.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http, close_session

    if not hub.url:
        raise RuntimeError("start the FakeHub before pointing the client at it")
    host = hub.url.split("://", 1)[1].rsplit(":", 1)[0]
    attrs: list[tuple[Any, str, Any]] = [
        (constants, "ENDPOINT", hub.url),
        (constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"),
        (constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {host}),
        (constants, "HF_HUB_OFFLINE", False),
        (constants, "HF_HUB_DISABLE_TELEMETRY", True),
        (_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(hub.url)}),
        (hf_api.api, "endpoint", hub.url),
    ]
    if cache_dir is not None:
        attrs.append((constants, "HF_HUB_CACHE", str(cache_dir)))
    if fast_retries:
        attrs.append((_http, "time", _InstantTime()))
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if token is not None:
        env["HF_TOKEN"] = token

    saved_attrs = [(obj, name, getattr(obj, name, _MISSING)) for obj, name, _ in attrs]
    saved_transformers_api = _swap_transformers_hf_api(None)
    saved_env = {key: os.environ.get(key) for key in env}
    close_session()  # no pooled connection to an earlier server (same port, maybe) may be reused
    try:
        for obj, name, value in attrs:
            setattr(obj, name, value)
        os.environ.update(env)
        yield hub
    finally:
        for obj, name, value in reversed(saved_attrs):
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _swap_transformers_hf_api(saved_transformers_api)  # also if transformers was first imported inside
        close_session()


def _swap_transformers_hf_api(value: Any) -> Any:
    """Set transformers' shared ``HfApi`` (``transformers.utils.hub._hf_api``, None = made afresh at its next use)
    where transformers is imported; return the one it had (None if none or not imported)."""
    module = sys.modules.get("transformers.utils.hub")
    if module is None or not hasattr(module, "_hf_api"):
        return None
    old, module._hf_api = module._hf_api, value
    return old


def fake_hub(cache_dir: str | os.PathLike | None = None, **endpoint_kwargs: Any) -> Iterator[FakeHub]:
    """Generator for a pytest fixture: a started FakeHub with the client pointed at it, a private hub cache.

    Use as ``hub = pytest.fixture(fake_hub)``, or wrap it: ``def hub(tmp_path): yield from fake_hub(tmp_path)``. The
    hub is stopped and the client restored on teardown; without ``cache_dir`` a temporary one is made and removed.
    """
    with ExitStack() as stack:
        if cache_dir is None:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="fake-hub-cache-"))
        hub = stack.enter_context(FakeHub())
        stack.enter_context(fake_hub_endpoint(hub, cache_dir=Path(cache_dir), **endpoint_kwargs))
        yield hub
