"""Helpers of the serve tests: a real `vlmexport serve` subprocess and image URLs."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``vlmexport serve BUNDLE ARGS`` on 127.0.0.1:<free port>; stopped (and its log kept) on close."""

    def __init__(self, bundle: Path, *args: str, log: Path, command: list[str] | None = None,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "wb")
        env = env or {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
        command = command or [sys.executable, "-m", "vlmexport.cli"]
        self.proc = subprocess.Popen([*command, "serve", str(bundle), "--port",
                                      str(self.port), "--log-level", "warning", *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if self.request("GET", "/health", timeout=1).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"the server did not answer /health within 120 s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, **kw)

    def metric(self, name: str, labels: str = "") -> float:
        text = self.request("GET", "/metrics").text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self):
        return json.loads(self.body)


def _request(self, method: str, path: str, body: bytes | dict | None = None, timeout: float = 60,
             lines: bool = False) -> Reply:
    """A raw HTTP request (stdlib http.client: what the openai client would not send)."""
    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


Server.request = _request
