"""The app run as a ZeroGPU Space runs it (tests/space_app.py), for HTTP and browser tests: a stand-in
for spaces' device API, a fake Hub of its own serving tiny models under the Space's model ids (one
of them gated), and the Space's variables, OAuth's included."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from evalkit import write_tasks

from hubserver import FakeHub, start_hub

ROOT = Path(__file__).resolve().parent.parent
SPACE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the page's default on a Space
SECOND_MODEL = "HuggingFaceTB/SmolLM2-360M-Instruct"  # another of the page's known-good models
GATED_MODEL = "google/gemma-3-270m"
GATED_READER_TOKEN = "hf_visitor_with_access"
# The Space's own token (a secret its operator set): it may read the gated model, but a visitor's
# Hub calls must never run with it.
OPERATOR_TOKEN = "hf_space_operator"


class DeviceApi:
    """spaces' device API on loopback (SPACES_ZERO_DEVICE_API_URL): every request answered 200, a
    schedule with a GPU that stayed idle (so spaces reuses a handler's worker), and each call counted;
    `schedules` keeps the durations asked for."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.schedules: list[int] = []
        self.failed_releases = 0
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args) -> None:
                pass

            def do_POST(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                body = api._answer(url.path, query)
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def _answer(self, path: str, query: dict[str, str]) -> dict | None:
        with self._lock:
            self.calls[path] += 1
            if path == "/schedule":
                self.schedules.append(int(query["durationSeconds"]))
                return {"idle": True, "nvidiaIndex": 0, "nvidiaUUID": "GPU-0000", "allowToken": uuid.uuid4().hex}
            if path == "/release" and query.get("fail") == "true":
                self.failed_releases += 1
        return None

    def count(self, path: str) -> int:
        with self._lock:
            return self.calls[path]

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def publish(hub: FakeHub, repo_id: str, folder: Path, *, gated: bool = False, allowed: tuple[str, ...] = ()) -> None:
    """Put every file of a model folder on the fake Hub under `repo_id`."""
    hub.add_repo(repo_id, gated=gated, allowed_users=allowed)
    for item in sorted(folder.iterdir()):
        hub.add_file(repo_id, item.name, item.read_bytes())


@dataclass
class SpaceApp:
    """The running app: its URL, its device API, its Hub, and its output so far (for failures)."""

    url: str
    device: DeviceApi
    hub: FakeHub
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


def space_env(device: DeviceApi, hub: FakeHub, workdir: Path, port: int) -> dict[str, str]:
    """A ZeroGPU Space's variables (the OAuth ones of `hf_oauth: true` included), pointed at stand-ins."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FRANKENMERGE_", "GRADIO_", "SPACE"))}
    env.update(
        SPACE_ID="fm-tests/frankenmerge-studio",
        SPACE_HOST="fm-tests-frankenmerge-studio.hf.space",
        SPACE_AUTHOR_NAME="fm-tests",
        SPACE_REPO_NAME="frankenmerge-studio",
        SYSTEM="spaces",
        SPACES_ZERO_GPU="true",
        SPACES_ZERO_DEVICE_API_URL=device.url,
        ZEROGPU_OFFLOAD_DIR=str(workdir / "zerogpu"),
        OAUTH_CLIENT_ID="fm-tests-client",
        OAUTH_CLIENT_SECRET="fm-tests-secret",
        OAUTH_SCOPES="openid profile read-repos write-repos manage-repos",
        OPENID_PROVIDER_URL=hub.url,
        HF_ENDPOINT=hub.url,
        HF_TOKEN=OPERATOR_TOKEN,
        HF_HOME=str(workdir / "hf-home"),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        FRANKENMERGE_CACHE=str(workdir / "frankenmerge-cache"),
        FRANKENMERGE_EVAL_TASKS=str(write_tasks(workdir / "eval-tasks")),  # the operator's local eval tasks
        GRADIO_TEMP_DIR=str(workdir / "gradio"),
        GRADIO_SERVER_NAME="127.0.0.1",
        GRADIO_SERVER_PORT=str(port),
        GRADIO_ANALYTICS_ENABLED="False",
        NO_PROXY="127.0.0.1,localhost",
        PYTHONUNBUFFERED="1",
    )
    env.pop("TRITON_INTERPRET", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_space_app(models: dict[str, Path]) -> SpaceApp:
    """Publish `models` ({repo id: folder}; GATED_MODEL gated, readable with GATED_READER_TOKEN) on a
    fake Hub of the app's own, then start the app as a ZeroGPU Space and wait until it serves."""
    hub = start_hub()
    hub.add_token(GATED_READER_TOKEN, "visitor")
    hub.add_token(OPERATOR_TOKEN, "operator")
    for repo_id, folder in models.items():
        gated = repo_id == GATED_MODEL
        publish(hub, repo_id, folder, gated=gated, allowed=("visitor", "operator") if gated else ())
    device = DeviceApi()
    workdir = Path(tempfile.mkdtemp(prefix="space-app-"))
    port = free_port()
    env = space_env(device, hub, workdir, port)
    log_path = workdir / "app.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(  # a session of its own: stopping it stops spaces' forked workers too
            [sys.executable, str(ROOT / "tests" / "space_app.py")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    app = SpaceApp(f"http://127.0.0.1:{port}/", device, hub, process, log_path, env)
    deadline = time.monotonic() + 120
    import httpx

    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Space app exited ({process.returncode}):\n{app.log()}")
        try:
            if httpx.get(app.url, timeout=2).status_code == 200:
                return app
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_space_app(app)
    raise RuntimeError(f"the Space app did not start in 120 s:\n{app.log()}")


def stop_space_app(app: SpaceApp) -> None:
    """Stop the app and every process it forked (spaces' GPU workers outlive a terminated parent)."""
    os.killpg(app.process.pid, signal.SIGTERM)
    try:
        app.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(app.process.pid, signal.SIGKILL)
        app.process.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(app.process.pid, 0)  # a forked worker still in the group
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(app.process.pid, signal.SIGKILL)
    app.device.shutdown()
    app.hub.shutdown()
