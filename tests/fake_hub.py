"""A minimal stand-in for the Hugging Face Hub HTTP API on 127.0.0.1, for offline tests of the upload path.

It answers the calls `HfApi.whoami`, `HfApi.create_repo` and `HfApi.upload_folder` make (token check, repo
creation, pre-upload, commit) and records every request, so a test can check which files would reach the Hub and
which token authorised them. Files are always asked for inline ("regular" upload mode), so their bytes arrive in the
commit payload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    """`token`: when given, `whoami` accepts only this token (401 otherwise); `role`: the role `whoami` reports."""

    def __init__(self, token: str | None = None, role: str = "write"):
        self.requests: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.commits: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, status: int, payload) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                hub.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "auth": self.headers.get("Authorization"),
                        "body": body,
                    }
                )
                path = self.path.split("?")[0]
                if self.command == "GET" and path == "/api/whoami-v2":
                    auth = self.headers.get("Authorization") or ""
                    if not auth.startswith("Bearer ") or (token is not None and auth != f"Bearer {token}"):
                        return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    return self._reply(
                        200,
                        {
                            "type": "user",
                            "name": "someone",
                            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}},
                        },
                    )
                if self.command == "POST" and path == "/api/repos/create":
                    spec = json.loads(body)
                    repo = (
                        f"{spec.get('organization') or 'user'}/{spec['name']}"
                        if "/" not in spec["name"]
                        else spec["name"]
                    )
                    return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo, "id": repo})
                if m := re.fullmatch(r"/api/models/(.+)/preupload/(.+)", path):
                    files = json.loads(body)["files"]
                    return self._reply(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                            ]
                        },
                    )
                if m := re.fullmatch(r"/api/models/(.+)/commit/(.+)", path):
                    commit = {"repo": m.group(1), "files": {}}
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            commit["summary"] = item["value"].get("summary")
                        elif item["key"] == "file":
                            content = base64.b64decode(item["value"]["content"])
                            commit["files"][item["value"]["path"]] = content
                            hub.files[item["value"]["path"]] = content
                    hub.commits.append(commit)
                    return self._reply(
                        200,
                        {
                            "commitUrl": f"http://{self.headers['Host']}/{m.group(1)}/commit/" + "a" * 40,
                            "commitOid": "a" * 40,
                            "pullRequestUrl": None,
                        },
                    )
                if path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                if re.fullmatch(r"/api/models/(.+)/paths-info/(.+)", path):
                    return self._reply(200, [])
                if re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/.+", path):
                    tree = [
                        {"type": "file", "path": n, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                        for n, c in sorted(hub.files.items())
                    ]
                    return self._reply(200, tree)
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(/revision/.+)?", path):
                    repo = m.group(1)
                    siblings = [{"rfilename": name} for name in sorted(hub.files)]
                    return self._reply(200, {"id": repo, "modelId": repo, "sha": "a" * 40, "siblings": siblings})
                if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    content = hub.files.get(m.group(3))
                    if content is None:
                        return self._reply(404, {"error": f"no file {m.group(3)}"})
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(content)))
                    self.send_header("X-Repo-Commit", "a" * 40)
                    self.send_header("ETag", '"' + hashlib.sha256(content).hexdigest() + '"')
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(content)
                    return None
                return self._reply(404, {"error": f"fake hub does not serve {self.command} {path}"})

            do_GET = do_POST = do_PUT = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
