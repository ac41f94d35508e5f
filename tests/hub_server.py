"""A Hub on 127.0.0.1 for the round-trip tests: `olah` serves downloads, a small commit endpoint receives uploads.

Downloads: `olah` (a Hugging Face Hub mirror) in offline mode serves the git repositories under
`<root>/mirrors/models/<org>/<name>` with the Hub's HTTP API (`/api/models/...`, `/<org>/<name>/resolve/...`), so
`huggingface_hub` and transformers download from it exactly as from huggingface.co. One limit of olah 0.5.4: in
offline mode it resolves a repository's default revision (`GET /api/models/<id>`, no revision) from its proxy cache
only, never from a local git mirror, and answers 401 `RepoNotFound`; so a load must name its revision
(`from_pretrained(repo_id, revision="main")`), after which every request is served from the git repository.

Uploads: olah has no upload routes, so `CommitEndpoint` implements the Hub calls `push_to_hub` makes
(`POST /api/repos/create`, `/api/validate-yaml`, `.../preupload/<rev>`, `.../commit/<rev>`) and answers the model
card lookup with the Hub's 404 `EntryNotFound`. Every
file is offered as a regular (non-LFS) upload, so the content arrives inline in the commit request and is committed
with git into the repository olah serves: a push is then visible to a pull through olah.

Both servers bind 127.0.0.1 only, are started and stopped by the test fixtures, and every wait is bounded.
"""

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 10.0
_GIT_IDENTITY = ["-c", "user.name=deepseekv3-tests", "-c", "user.email=tests@localhost", "-c", "commit.gpgsign=false"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _git(repo_dir: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", *_GIT_IDENTITY, *args], cwd=repo_dir, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo_dir}: {result.stderr.strip()}")
    return result.stdout.strip()


class OlahHub:
    """An `olah` server in offline local-mirror mode, serving git repositories under `root / "mirrors"`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.mirrors_dir = self.root / "mirrors"
        self.port = free_port()
        self.endpoint = f"http://{HOST}:{self.port}"
        self.log_file = self.root / "olah.log"
        self._process: subprocess.Popen | None = None

    def repo_dir(self, repo_id: str) -> Path:
        return self.mirrors_dir / "models" / repo_id

    def init_repo(self, repo_id: str) -> Path:
        """Create an empty git repository for `repo_id` (branch `main`) if there is none."""
        repo_dir = self.repo_dir(repo_id)
        if not (repo_dir / ".git").is_dir():
            repo_dir.mkdir(parents=True, exist_ok=True)
            _git(repo_dir, "init", "-q", "-b", "main")
        return repo_dir

    def commit(self, repo_id: str, message: str) -> str:
        """Commit the working tree of `repo_id` on `main`; return the commit sha."""
        repo_dir = self.repo_dir(repo_id)
        _git(repo_dir, "add", "-A")
        _git(repo_dir, "commit", "-q", "--allow-empty", "-m", message)
        return _git(repo_dir, "rev-parse", "HEAD")

    def publish(self, folder: Path, repo_id: str) -> str:
        """Copy the files of `folder` into the repository `repo_id` and commit them; return the commit sha."""
        repo_dir = self.init_repo(repo_id)
        shutil.copytree(folder, repo_dir, dirs_exist_ok=True)
        return self.commit(repo_id, f"publish {folder.name}")

    def start(self) -> None:
        self.mirrors_dir.mkdir(parents=True, exist_ok=True)
        config_file = self.root / "olah.toml"
        config_file.write_text(
            "[basic]\n"
            f'host = "{HOST}"\n'
            f"port = {self.port}\n"
            f'repos-path = "{self.root / "cache"}"\n'
            f'mirror-netloc = "{HOST}:{self.port}"\n'
            f'mirror-lfs-netloc = "{HOST}:{self.port}"\n'
            f'mirrors-path = ["{self.mirrors_dir}"]\n'
            "[accessibility]\n"
            # offline: never contact huggingface.co; serve the local git mirrors only
            "offline = true\n",
            encoding="utf-8",
        )
        command = [sys.executable, "-m", "olah.server", "-c", str(config_file), "--log-path", str(self.root / "logs")]
        with open(self.log_file, "wb") as log:
            self._process = subprocess.Popen(command, cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"olah exited with code {self._process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/api/whoami-v2", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # the server answers (an error status is still an answer)
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"olah did not answer on {self.endpoint} within {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=SHUTDOWN_TIMEOUT_S)

    def log(self) -> str:
        return self.log_file.read_text(encoding="utf-8", errors="replace") if self.log_file.exists() else ""


class _CommitHandler(BaseHTTPRequestHandler):
    server: "_CommitServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's signature)
        self.server.requests.append(f"{self.command} {self.path}")

    def _reply(self, status: int, payload: dict | None = None, headers: dict | None = None) -> None:
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _entry_not_found(self) -> None:
        # What huggingface.co answers for a missing file: `huggingface_hub` raises EntryNotFoundError.
        self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})

    def do_HEAD(self):
        self._entry_not_found()

    def do_GET(self):
        self._entry_not_found()

    def do_POST(self):
        hub, body = self.server.hub, self._body()
        if self.path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}"
            hub.init_repo(repo_id)
            self._reply(200, {"url": f"{self.server.endpoint}/{repo_id}", "name": repo_id})
            return
        if self.path == "/api/validate-yaml":
            # The model card's metadata is not validated here; the Hub would reject invalid YAML.
            self._reply(200, {"errors": [], "warnings": []})
            return
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/?]+)(\?.*)?", self.path)
        if match is None or match.group(3) != "main":
            self._reply(404, {"error": f"not implemented by the test Hub: POST {self.path}"})
            return
        repo_id, action = match.group(1), match.group(2)
        if action == "preupload":
            files = json.loads(body)["files"]
            modes = [{"path": file["path"], "uploadMode": "regular", "shouldIgnore": False} for file in files]
            self._reply(200, {"files": modes, "commitOid": None})
            return
        repo_dir, summary = hub.repo_dir(repo_id), "push"
        for line in body.decode().splitlines():
            entry = json.loads(line)
            value = entry["value"]
            if entry["key"] == "header":
                summary = value["summary"]
            elif entry["key"] == "file":
                target = repo_dir / value["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(value["content"]))
                self.server.pushed_files.append(value["path"])
            elif entry["key"] == "deletedFile":
                (repo_dir / value["path"]).unlink()
            else:
                self._reply(400, {"error": f"the test Hub does not accept {entry['key']!r} operations"})
                return
        sha = hub.commit(repo_id, summary)
        self._reply(200, {"commitUrl": f"{self.server.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha})


class _CommitServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: OlahHub):
        super().__init__((HOST, 0), _CommitHandler)
        self.hub = hub
        self.endpoint = f"http://{HOST}:{self.server_address[1]}"
        self.requests: list[str] = []
        self.pushed_files: list[str] = []


class CommitEndpoint:
    """The upload half of the test Hub: commits pushed files into `hub`'s git repositories."""

    def __init__(self, hub: OlahHub):
        self._server = _CommitServer(hub)
        self.endpoint = self._server.endpoint
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def requests(self) -> list[str]:
        """Every request received, as `"METHOD path"`."""
        return self._server.requests

    @property
    def pushed_files(self) -> list[str]:
        """Paths of every file received in a commit, in order."""
        return self._server.pushed_files

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=SHUTDOWN_TIMEOUT_S)


def hub_env(hf_home: Path, endpoint: str) -> dict[str, str]:
    """Environment for a subprocess that talks to `endpoint` as its Hub, with its own empty cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_ETAG_TIMEOUT="10",
        HF_HUB_DOWNLOAD_TIMEOUT="10",
    )
    return env
