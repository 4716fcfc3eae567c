"""Headless Chromium driven over the Chrome DevTools Protocol (CDP), with aiohttp only.

A small, synchronous client for tests and scripts: it starts `chromium --headless=new` with its own
temporary profile, connects to the first page's DevTools websocket and offers `navigate`,
`evaluate` (JavaScript, awaiting promises), `wait_for`, `screenshot` and `close`. No Playwright or
Selenium: only the system Chromium (Debian: `apt-get install -y chromium`) and aiohttp.

    with Browser(width=1600, height=1000) as b:
        b.navigate("http://127.0.0.1:8188")
        b.wait_for("!!window.app?.graph")
        print(b.evaluate("document.title"))
        b.screenshot("page.png")
"""
from __future__ import annotations

import asyncio
import atexit
import base64
import collections
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
import time

import aiohttp

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


class BrowserError(RuntimeError):
    """Chromium did not start, a CDP command failed, or page JavaScript threw."""


def find_chromium() -> str | None:
    """The Chromium/Chrome executable: $CHROMIUM if set, else the first of CANDIDATES on PATH."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"]) or None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium process and one page (tab), driven synchronously over CDP."""

    def __init__(self, executable: str | None = None, *, width: int = 1280, height: int = 800,
                 timeout: float = 30.0, extra_args: tuple[str, ...] = ()):
        self.executable = executable or find_chromium()
        self.width, self.height = width, height
        self.timeout = timeout
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.profile: str | None = None
        self.ws_url: str | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        self.console: list[dict] = []      # {"type", "text"} of console.* calls and uncaught exceptions
        self._loop = asyncio.new_event_loop()
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._event_waiters: list[tuple[str, asyncio.Future]] = []

    # -- process --------------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The Chromium command line: headless, no sandbox (root in containers), a fresh profile."""
        return [self.executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "--no-first-run",
                "--no-default-browser-check", "--hide-scrollbars", "--mute-audio",
                f"--window-size={self.width},{self.height}", *self.extra_args, "about:blank"]

    def start(self) -> "Browser":
        """Start Chromium, read its DevTools websocket address from stderr, attach to its page."""
        if not self.executable:
            raise BrowserError("no Chromium found (apt-get install -y chromium, or set $CHROMIUM)")
        self.profile = tempfile.mkdtemp(prefix="cdp-profile-")
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace")
        atexit.register(self.close)
        found: list[str] = []
        ready = threading.Event()

        def drain() -> None:  # keep reading stderr so Chromium never blocks on a full pipe
            for line in self.proc.stderr:
                self.stderr_tail.append(line.rstrip())
                if not found and "DevTools listening on " in line:
                    found.append(line.split("DevTools listening on ", 1)[1].strip())
                    ready.set()
            ready.set()

        threading.Thread(target=drain, name="chromium-stderr", daemon=True).start()
        if not ready.wait(self.timeout) or not found:
            self.close()
            raise BrowserError(f"Chromium did not print its DevTools address within {self.timeout:.0f} s:\n"
                               + "\n".join(self.stderr_tail))
        self._run(self._connect(found[0]))
        return self

    async def _connect(self, browser_ws: str) -> None:
        port = int(browser_ws.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        self._http = aiohttp.ClientSession()
        deadline = time.monotonic() + self.timeout
        while True:  # the initial about:blank page may take a moment to be listed
            async with self._http.get(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in await r.json(content_type=None) if t.get("type") == "page"]
            if pages:
                break
            if time.monotonic() > deadline:
                raise BrowserError("Chromium lists no page target")
            await asyncio.sleep(0.1)
        self.ws_url = pages[0]["webSocketDebuggerUrl"]
        self._ws = await self._http.ws_connect(self.ws_url, max_msg_size=0)
        self._reader = asyncio.ensure_future(self._read())
        for domain in ("Page", "Runtime"):
            await self._send(f"{domain}.enable")
        await self._send("Emulation.setDeviceMetricsOverride",
                         {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})

    def close(self) -> None:
        """Close the websocket, end Chromium (this process only, by its PID), delete its profile."""
        if self._loop.is_closed():
            return
        try:
            self._run(self._disconnect(), timeout=10)
        except Exception:  # noqa: BLE001  (closing is best effort)
            pass
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self.profile:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None
        self._loop.close()

    async def _disconnect(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()

    def __enter__(self) -> "Browser":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- protocol -------------------------------------------------------------------------------
    def _run(self, coro, timeout: float | None = None):
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout or self.timeout))

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                self.console.append({"type": params.get("type"), "text": text})
            elif method == "Runtime.exceptionThrown":
                d = params.get("exceptionDetails", {})
                self.console.append({"type": "exception",
                                     "text": (d.get("exception") or {}).get("description") or d.get("text", "")})
            for name, fut in list(self._event_waiters):
                if name == method and not fut.done():
                    fut.set_result(params)
                    self._event_waiters.remove((name, fut))
        for fut in self._pending.values():  # the websocket closed: fail whoever still waits
            if not fut.done():
                fut.set_exception(BrowserError("DevTools websocket closed"))

    async def _send(self, method: str, params: dict | None = None) -> dict:
        msg_id = next(self._ids)
        fut = self._loop.create_future()
        self._pending[msg_id] = fut
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        answer = await fut
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error'].get('message')} {answer['error'].get('data', '')}")
        return answer.get("result", {})

    def send(self, method: str, params: dict | None = None, timeout: float | None = None) -> dict:
        """Send one raw CDP command to the page; returns its result object."""
        return self._run(self._send(method, params), timeout)

    # -- page -----------------------------------------------------------------------------------
    def navigate(self, url: str, timeout: float | None = None) -> None:
        """Open `url` in the page and wait for its load event."""
        async def go():
            loaded = self._loop.create_future()
            self._event_waiters.append(("Page.loadEventFired", loaded))
            result = await self._send("Page.navigate", {"url": url})
            if result.get("errorText"):
                raise BrowserError(f"navigate {url}: {result['errorText']}")
            await loaded
        self._run(go(), timeout)

    def evaluate(self, expression: str, timeout: float | None = None):
        """Evaluate a JavaScript expression in the page, await it if it is a promise, and return
        its value as JSON (returnByValue). A thrown exception raises BrowserError with its text."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True, "userGesture": True}, timeout)
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            text = (d.get("exception") or {}).get("description") or d.get("text", "")
            raise BrowserError(f"JavaScript error: {text}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float | None = None, interval: float = 0.1):
        """Poll a JavaScript expression until it is truthy; returns its value or raises BrowserError."""
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        last_error = None
        while True:
            try:
                value = self.evaluate(expression, timeout=max(1.0, deadline - time.monotonic()))
                if value:
                    return value
            except BrowserError as e:
                last_error = e
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout:.0f} s waiting for {expression!r}"
                                   + (f" (last error: {last_error})" if last_error else ""))
            time.sleep(interval)

    def screenshot(self, path: str | os.PathLike) -> pathlib.Path:
        """Save a PNG of the page's viewport to `path` (folders created); returns the path."""
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
