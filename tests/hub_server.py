"""A stand-in Hugging Face Hub on 127.0.0.1, just large enough for the real `huggingface_hub` client.

It exists so that tests exercise the real client over real HTTP (create_repo, create_branch, upload_folder,
hf_hub_download as `from_pretrained` uses it) without the internet. It is not a product: one process, state in
memory, no LFS/Xet storage. Endpoints, as huggingface_hub 2.x calls them:

    POST /api/repos/create                               {"name", "organization", "visibility"} -> {"url"}
    POST /api/models/{repo}/branch/{branch}              {"startingPoint"?} -> 409 if it exists
    POST /api/models/{repo}/preupload/{revision}         {"files": [{"path", "size", "sample"}]} -> upload modes
    POST /api/models/{repo}/commit/{revision}            NDJSON: a header line, then "file" lines (base64)
    POST /api/validate-yaml                              {"content": README.md} -> 400 {"errors"} if malformed
    HEAD/GET /{repo}/resolve/{revision}/{path}           file bytes + ETag, X-Repo-Commit, Content-Length
    GET  /api/models/{repo}[/revision/{revision}]        repo info (sha, siblings)

Preupload answers "regular" for every file, so the client sends every file base64-encoded inside the commit
payload. (The real Hub answers "lfs" for large or binary files, which the client then uploads to Xet storage; that
path needs a storage server and is out of scope here.) Errors carry the X-Error-Code header the client maps to
RepositoryNotFoundError, RevisionNotFoundError and EntryNotFoundError, which `from_pretrained` relies on to skip
optional files.
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [  # (method, pattern, handler name); the first match wins
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{REPO}/branch/(?P<rev>[^/]+)$"), "create_branch"),
    ("POST", re.compile(rf"^/api/models/{REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ("HEAD", re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("GET", re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a file: what the Hub reports as the ETag and oid of a non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubError(Exception):
    def __init__(self, status, message, error_code=None, **extra):
        super().__init__(message)
        self.status, self.message, self.error_code, self.extra = status, message, error_code, extra


class Repo:
    """Commits are full snapshots {path: bytes}; branches point at commit ids."""

    def __init__(self, private):
        self.private = private
        self.commits = {}
        self.branches = {"main": self._new_commit({}, "initial commit", parent="")}

    def _new_commit(self, files, message, parent):
        digest = hashlib.sha1(parent.encode() + message.encode())
        for path in sorted(files):
            digest.update(path.encode() + git_blob_sha1(files[path]).encode())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        return sha

    def resolve(self, revision):
        """Branch name or commit id -> commit id."""
        sha = self.branches.get(revision, revision)
        if sha not in self.commits:
            raise HubError(404, f"Revision Not Found: {revision}", "RevisionNotFound")
        return sha

    def commit(self, branch, files, deleted, message):
        parent = self.resolve(branch)
        snapshot = {path: data for path, data in self.commits[parent].items() if path not in deleted}
        snapshot.update(files)
        self.branches[branch] = self._new_commit(snapshot, message, parent)
        return self.branches[branch]


class StandInHub:
    """Start with `with StandInHub(token="hf_test") as hub:`; `hub.url` is the endpoint.

    Write requests need `Authorization: Bearer <token>`. `hub.requests` lists (method, path) of every request, so a
    test can prove that nothing was sent; `hub.files(repo_id, revision)` reads a snapshot back.
    """

    def __init__(self, token="hf_test"):
        self.token = token
        self.repos = {}
        self.requests = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every answer sets Content-Length

            def do_HEAD(self):
                hub._dispatch(self, "HEAD")

            def do_GET(self):
                hub._dispatch(self, "GET")

            def do_POST(self):
                hub._dispatch(self, "POST")

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free port chosen by the OS
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id, revision="main"):
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.resolve(revision)])

    # ------------------------------------------------------------------ plumbing

    def _dispatch(self, request, method):
        path = urlsplit(request.path).path
        with self.lock:
            self.requests.append((method, path))
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        status, headers, payload = 404, {}, json.dumps({"error": f"no route for {method} {path}"}).encode()
        try:
            for route_method, pattern, name in ROUTES:
                match = pattern.match(path)
                if route_method == method and match:
                    params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    self._check_token(request, required=method == "POST")
                    with self.lock:
                        status, headers, payload = getattr(self, name)(body=body, method=method, **params)
                    break
        except HubError as error:
            status, payload = error.status, json.dumps({"error": error.message, **error.extra}).encode()
            headers = {"X-Error-Code": error.error_code} if error.error_code else {}
            headers["X-Error-Message"] = error.message
        request.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        for key, value in headers.items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        if method != "HEAD":
            request.wfile.write(payload)

    def _check_token(self, request, required):
        """Writes need the token; any request that carries a wrong one is refused, as the Hub does."""
        sent = request.headers.get("Authorization")
        if (required or sent is not None) and sent != f"Bearer {self.token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id):
        if repo_id not in self.repos:
            raise HubError(404, f"Repository Not Found: {repo_id}", "RepoNotFound")
        return self.repos[repo_id]

    @staticmethod
    def _json(status, value):
        return status, {}, json.dumps(value).encode()

    # ------------------------------------------------------------------ endpoints

    def create_repo(self, body, **_):
        request = json.loads(body)
        repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
        if repo_id in self.repos:  # the client reads "url" from this answer too (exist_ok=True)
            raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        self.repos[repo_id] = Repo(private=request.get("visibility") == "private")
        return self._json(200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def validate_yaml(self, body, **_):
        """The client sends README.md here before every upload that contains it. Checked like the Hub does, in
        part: the front matter parses to a mapping and each model-index result names a task, a dataset and metrics
        with a type and a value."""
        content = json.loads(body)["content"]
        errors = []
        if content.startswith("---\n"):
            try:
                metadata = yaml.safe_load(content.split("---\n", 2)[1]) or {}
            except (yaml.YAMLError, IndexError) as error:
                metadata, errors = {}, [f"YAML does not parse: {error}"]
            if not isinstance(metadata, dict):
                metadata, errors = {}, ["the metadata must be a YAML mapping"]
            for model in metadata.get("model-index") or []:
                for result in model.get("results") or []:
                    task, dataset = result.get("task") or {}, result.get("dataset") or {}
                    metrics = result.get("metrics")
                    if not (task.get("type") and dataset.get("type") and dataset.get("name") and metrics
                            and all(isinstance(m, dict) and "type" in m and "value" in m for m in metrics)):
                        errors.append(f"model-index result is incomplete: {result}")
        if errors:
            return 400, {}, json.dumps({"errors": [{"message": error} for error in errors]}).encode()
        return self._json(200, {"errors": [], "warnings": []})

    def create_branch(self, repo, rev, body, **_):
        target = self._repo(repo)
        if rev in target.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{rev}")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        target.branches[rev] = target.resolve(start)
        return self._json(200, {})

    def preupload(self, repo, rev, body, **_):
        files = self.files(repo, rev) if rev in self._repo(repo).branches else {}
        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                   "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None}
                  for f in json.loads(body)["files"]]
        return self._json(200, {"files": answer})

    def commit(self, repo, rev, body, **_):
        target = self._repo(repo)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header, operations = lines[0]["value"], lines[1:]
        files, deleted = {}, set()
        for operation in operations:
            key, value = operation["key"], operation["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.add(value["path"])
            else:  # "lfsFile" would reference content uploaded to storage this server does not have
                raise HubError(400, f"the stand-in Hub accepts regular files only, got a {key!r} operation")
        if rev not in target.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        sha = target.commit(rev, files, deleted, header["summary"])
        return self._json(200, {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha,
                                "success": True})

    def repo_info(self, repo, rev="main", **_):
        sha = self._repo(repo).resolve(rev)
        files = self.repos[repo].commits[sha]
        return self._json(200, {"id": repo, "modelId": repo, "sha": sha, "private": self.repos[repo].private,
                                "siblings": [{"rfilename": path} for path in sorted(files)]})

    def resolve(self, repo, rev, path, method, **_):
        sha = self._repo(repo).resolve(rev)
        files = self.repos[repo].commits[sha]
        if path not in files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        content = files[path]
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{git_blob_sha1(content)}"',
                   "X-Repo-Commit": sha}
        return 200, headers, content
