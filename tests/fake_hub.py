"""An in-memory stand-in for the Hugging Face Hub's HTTP API, for tests only.

The Hub's network cannot exist on CI machines, so tests replace *only the transport*: huggingface_hub's own client
code (create_repo, preupload, ndjson commits, snapshot_download) runs unchanged against this handler through
``huggingface_hub.set_client_factory``. It implements the handful of endpoints those calls use.
"""

from __future__ import annotations

import base64
import hashlib
import json
from contextlib import contextmanager
from typing import Iterator

import httpx2
import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.utils import _http


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "files": {path: bytes}, "sha": str}
        self.requests: list[tuple[str, str]] = []

    def _json(self, status: int, data: dict) -> httpx2.Response:
        return httpx2.Response(status, json=data)

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        if path == "/api/repos/create":
            body = json.loads(request.content)
            repo_id = f"{body.get('organization') or 'me'}/{body['name']}" if "/" not in body["name"] else body["name"]
            private = body["private"] if "private" in body else body.get("visibility") == "private"
            self.repos.setdefault(repo_id, {"private": private, "files": {}, "sha": "0" * 40})
            return self._json(200, {"url": f"https://huggingface.co/{repo_id}", "name": repo_id})
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            if "/preupload/" in rest:
                files = json.loads(request.content)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
            if "/commit/" in rest:
                repo_id = rest.split("/commit/")[0]
                repo = self.repos[repo_id]
                for line in request.content.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                repo["sha"] = hashlib.sha1(json.dumps(sorted(repo["files"])).encode() + repo["sha"].encode()).hexdigest()
                return self._json(200, {"commitOid": repo["sha"], "commitUrl": f"https://huggingface.co/{repo_id}/commit/{repo['sha']}"})
            if "/tree/" in rest:
                repo = self.repos[rest.split("/tree/")[0]]
                entries = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                           for p, b in sorted(repo["files"].items())]
                return httpx2.Response(200, json=entries)
            if "/revision/" in rest:
                repo_id = rest.split("/revision/")[0]
                repo = self.repos.get(repo_id)
                if repo is None:
                    return self._json(404, {"error": "Repository not found"})
                siblings = [{"rfilename": p, "size": len(b)} for p, b in sorted(repo["files"].items())]
                return self._json(200, {"id": repo_id, "sha": repo["sha"], "siblings": siblings, "private": repo["private"]})
        if "/resolve/" in path:
            repo_id, rest = path.lstrip("/").split("/resolve/", 1)
            repo = self.repos.get(repo_id)
            filename = rest.split("/", 1)[1]
            if repo is None or filename not in repo["files"]:
                return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"})
            content = repo["files"][filename]
            headers = {"X-Repo-Commit": repo["sha"], "ETag": f'"{hashlib.sha1(content).hexdigest()}"', "Content-Length": str(len(content))}
            return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else content)
        if path in ("/api/agent-harnesses", "/api/validate-yaml"):  # telemetry; model-card metadata check
            return self._json(200, {})
        return self._json(404, {"error": f"fake hub: no route for {request.method} {path}"})


@contextmanager
def fake_hub(monkeypatch) -> Iterator[FakeHub]:
    hub = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    monkeypatch.setenv("HF_HUB_CACHE", str(__import__("tempfile").mkdtemp(prefix="fake-hub-cache-")))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", __import__("os").environ["HF_HUB_CACHE"])
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub.handle)))
    try:
        yield hub
    finally:
        huggingface_hub.set_client_factory(_http.default_client_factory)
