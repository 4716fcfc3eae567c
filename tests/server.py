"""The real ComfyUI server, headless, in a subprocess: start, submit API-format graphs, fetch images.

Used by the `server` fixture (tests/conftest.py) and by tools/demo.py. Standard library (urllib)
plus numpy and pillow only. The server is the ComfyUI that tools/setup.sh prepared (or
COMFYUI_PATH), with only this pack and the TinySD demo-model loader loaded from its custom_nodes/
(the links setup.sh made); its input/output/temp/user folders and its log live in a temporary
folder, its database is in memory.
"""
from __future__ import annotations

import atexit
import io
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from comfyui_env import comfyui_path  # noqa: E402  (one rule for where ComfyUI is)
PACK_FOLDERS = ("comfyui-attention-edit", "comfyui-attention-edit-demo-model")


class ServerError(RuntimeError):
    """The server failed to start, rejected a graph, or a graph failed; carries the log tail."""


def default_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """`with ComfyServer() as s: entry = s.wait(s.queue(graph)); s.images(entry)`."""

    def __init__(self, workdir: str | os.PathLike | None = None, *, port: int | None = None,
                 python: str | None = None, comfyui: str | os.PathLike | None = None,
                 extra_args: tuple[str, ...] = (), only_pack_nodes: bool = True):
        self.comfyui = pathlib.Path(comfyui) if comfyui else comfyui_path()
        self.python = python or default_python()
        self._own_workdir = workdir is None
        self.workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="attn-edit-server-"))
        self.port = port
        self.extra_args = tuple(extra_args)
        self.only_pack_nodes = only_pack_nodes
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "comfyui.log"
        self._log = None

    # -- process --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> pathlib.Path:
        return self.workdir / "output"

    def command(self) -> list[str]:
        cmd = [self.python, str(self.comfyui / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--use-pytorch-cross-attention",
               "--output-directory", str(self.workdir / "output"), "--input-directory", str(self.workdir / "input"),
               "--temp-directory", str(self.workdir), "--user-directory", str(self.workdir / "user"),
               "--database-url", "sqlite:///:memory:"]
        if self.only_pack_nodes:  # the user's other custom nodes stay out of the tests
            cmd += ["--disable-all-custom-nodes", "--whitelist-custom-nodes", *PACK_FOLDERS]
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 90.0) -> "ComfyServer":
        if not (self.comfyui / "main.py").exists():
            raise ServerError(f"no ComfyUI at {self.comfyui}: run tools/setup.sh first (or set COMFYUI_PATH)")
        missing = [f for f in PACK_FOLDERS if not (self.comfyui / "custom_nodes" / f).exists()]
        if missing:
            raise ServerError(f"{', '.join(missing)} not in {self.comfyui / 'custom_nodes'}: run tools/setup.sh")
        for sub in ("output", "input", "user"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=str(self.comfyui), env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode} while starting"
                                  f"{self._tail_text()}")
            try:
                self.object_info(timeout=10)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"ComfyUI did not answer GET /object_info within {timeout:.0f} s"
                                  f"{self._tail_text()}")
            time.sleep(0.3)

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the server process (by its PID), kill it if it has not exited after `timeout`."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def _tail_text(self, lines: int = 60) -> str:
        return f"\n--- last {lines} lines of {self.log_path} ---\n{self.log_tail(lines)}"

    # -- HTTP -----------------------------------------------------------------------------------
    def _request(self, path: str, data: dict | None = None, timeout: float = 30.0) -> bytes:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()

    def _json(self, path: str, data: dict | None = None, timeout: float = 30.0):
        return json.loads(self._request(path, data, timeout) or b"null")

    def object_info(self, timeout: float = 30.0) -> dict:
        """GET /object_info: every node class the server knows, with its inputs and outputs."""
        return self._json("/object_info", timeout=timeout)

    def queue(self, graph: dict) -> str:
        """POST /prompt; returns the prompt id. A graph that fails validation raises ServerError."""
        try:
            answer = self._json("/prompt", {"prompt": graph, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise ServerError(f"POST /prompt rejected the graph ({e.code}): {detail}") from None
        if answer.get("node_errors"):
            raise ServerError(f"POST /prompt reported node errors: {json.dumps(answer['node_errors'])}")
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self._json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Poll GET /history/{id} until the graph finished; returns its history entry.

        Raises ServerError with the failing node, its type and ComfyUI's exception message when the
        graph failed, and with the log tail when it does not finish in time or the server died."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("status_str") == "error":
                raise ServerError(f"graph {prompt_id} failed: {self.error_text(entry)}")
            if entry is not None and status.get("completed", True):
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with code {self.proc.returncode}{self._tail_text()}")
            if time.monotonic() > deadline:
                raise ServerError(f"graph {prompt_id} did not finish within {timeout:.0f} s{self._tail_text()}")
            time.sleep(0.1)

    def run(self, graph: dict, timeout: float = 120.0) -> dict:
        return self.wait(self.queue(graph), timeout)

    @staticmethod
    def error_text(entry: dict) -> str:
        """'node <id> (<type>): <exception message>' for each execution error of a history entry."""
        errors = []
        for kind, data in ((entry or {}).get("status") or {}).get("messages", []):
            if kind in ("execution_error", "execution_interrupted"):
                errors.append(f"{kind}: node {data.get('node_id')} ({data.get('node_type')}): "
                              f"{data.get('exception_type', '')}: {data.get('exception_message', '')}".rstrip(": "))
        return "; ".join(errors) or json.dumps((entry or {}).get("status"))

    def image_refs(self, entry: dict, node_id: str | None = None) -> list[dict]:
        outputs = entry.get("outputs", {})
        ids = [node_id] if node_id is not None else sorted(outputs)
        if node_id is not None and node_id not in outputs:
            raise ServerError(f"node {node_id} has no output in this history entry (outputs: {sorted(outputs)})")
        return [ref for i in ids for ref in outputs[i].get("images", [])]

    def image_bytes(self, ref: dict) -> bytes:
        query = urllib.parse.urlencode({"filename": ref["filename"], "subfolder": ref.get("subfolder", ""),
                                        "type": ref.get("type", "output")})
        return self._request(f"/view?{query}")

    def images(self, entry: dict, node_id: str | None = None) -> list[np.ndarray]:
        """The images an entry's output nodes saved (one node, or all in node-id order), read via
        GET /view, as H x W x 3 float32 arrays in [0, 1]."""
        out = []
        for ref in self.image_refs(entry, node_id):
            with Image.open(io.BytesIO(self.image_bytes(ref))) as im:
                out.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
        return out

    def interrupt(self) -> None:
        """POST /interrupt: stop the graph that is running."""
        self._request("/interrupt", {})

    # A prompt of two core nodes that costs nothing: the barrier after /free (see free()).
    BARRIER = {"barrier_image": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                                         "color": 0}},
               "barrier_preview": {"class_type": "PreviewImage", "inputs": {"images": ["barrier_image", 0]}}}

    def free(self) -> None:
        """POST /free: the server drops its output caches and unloads its models. ComfyUI's worker reads
        that request between prompts, so a prompt queued at once may still run on the old cache;
        one trivial prompt run first makes sure the request was read before the next prompt starts."""
        self._request("/free", {"unload_models": True, "free_memory": True})
        self.run(self.BARRIER)

    def running(self) -> list[str]:
        """Ids of the prompts the server is executing now (GET /queue)."""
        return [item[1] for item in self._json("/queue").get("queue_running", [])]

    def rss_bytes(self) -> int:
        """The server process's resident memory (Linux /proc)."""
        for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise ServerError("no VmRSS in /proc status")
