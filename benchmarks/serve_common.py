"""Shared by serve_load.py and serve_soak.py: a bundle, a `vlmexport serve` subprocess on a free
loopback port, and test questions with their `vlmexport run` answers.

Loopback only: every request goes to 127.0.0.1.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "300", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "vlmexport.cli", *args], capture_output=True, text=True, env=env,
                          check=True, **kw)


def demo_bundle(workdir: Path, precision: str = "fp32") -> Path:
    """The shipped demo model as an ONNX bundle (built once into WORKDIR)."""
    out = workdir / f"demo-{precision}"
    if not (out / "manifest.json").is_file():
        cli("build", "--out", str(out), "--format", "onnx", "--precision", precision, "--no-validate")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bundle: Path, *args: str, log: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen([sys.executable, "-m", "vlmexport.cli", "serve", str(bundle), "--port",
                                      str(self.port), "--log-level", "warning", *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: see {log}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        self.close()
        raise SystemExit(f"the server did not come up: see {log}")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=300)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


@dataclass(frozen=True)
class Item:
    question: str
    image: Path
    url: str
    expected: str  # what `vlmexport run` prints


def items(bundle: Path, workdir: Path, n: int, max_tokens: int, backend: str = "onnxruntime",
          precision: str | None = None) -> list[Item]:
    """``n`` synthetic test questions with images, each answered once by `vlmexport run` (greedy) on the
    backend and precision the server runs."""
    import json

    from vlmexport.data import SyntheticVQA

    size = json.loads((bundle / "preprocessor_config.json").read_text())["vlmexport"]["image_size"]
    cats = SyntheticVQA(image_size=size, seed=5).eval_items("test", 2)
    out = []
    imgdir = workdir / "images"
    imgdir.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for i, it in enumerate(cats[:n]):
        path = imgdir / f"item{i}.png"
        Image.fromarray(it.image).save(path)
        ref = cli("run", str(bundle), "--backend", backend, "--image", str(path), "--prompt", it.question,
                  "--max-new-tokens", str(max_tokens), *(["--precision", precision] if precision else [])).stdout.strip()
        url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        out.append(Item(it.question, path, url, ref))
    return out


def ask(client, model: str, item: Item, max_tokens: int, stream: bool = False) -> str:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": item.url}},
                                             {"type": "text", "text": item.question}]}]
    if stream:
        chunks = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content.strip()


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]
