"""`ratchet serve` as a subprocess in its own data directory, for benchmarks and end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from serving.client import RatchetClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through RatchetServer.__exit__, which stops the server


class RatchetServer:
    """Starts `ratchet serve`, waits until /health answers, and on exit stops it and checks that
    nothing it started (vLLM and its engine core) is left running."""

    def __init__(self, data_dir: str | Path, engine: str = "vllm", models_dir: str | Path | None = None,
                 model: str | None = None, startup_timeout: float = 900, env: dict | None = None):
        self.data_dir = Path(data_dir)
        self.engine = engine
        self.models_dir = models_dir
        self.model = model
        self.startup_timeout = startup_timeout
        self.extra_env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir / f"serve-{engine}.log"
        self.proc: subprocess.Popen | None = None
        self.left_running: list[str] = []
        self._client: RatchetClient | None = None
        self._sigterm = None  # the SIGTERM handler before ours, put back on exit

    def __enter__(self) -> "RatchetServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if threading.current_thread() is threading.main_thread():  # a benchmark killed (SIGTERM) stops its server
            self._sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        env = {**os.environ, **self.extra_env}
        if self.models_dir:
            env["RATCHET_MODELS_DIR"] = str(self.models_dir)
        self.proc = subprocess.Popen(self.command(), env=env, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:  # a failed or stopped (SIGTERM) start runs no __exit__, so it stops the server here
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ratchet serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"ratchet serve was not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def command(self) -> list[str]:
        """The command that starts the server."""
        cmd = [sys.executable, "-m", "serving.cli", "serve", "--engine", self.engine, "--port", str(self.port),
               "--data-dir", str(self.data_dir)]
        return cmd + ["--model", self.model] if self.model else cmd

    def __exit__(self, *exc) -> None:
        import psutil

        proc, self.proc = self.proc, None
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None
        if proc is None:
            return
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _, alive = psutil.wait_procs(children, timeout=30)
        self.left_running = [" ".join(p.cmdline()[:4]) for p in alive if p.is_running()]
        for p in alive:
            p.kill()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- the public API, as a client uses it (serving.client) ---------------------------------
    @property
    def client(self) -> RatchetClient:
        if self._client is None:
            self._client = RatchetClient(self.url, timeout=900)
        return self._client

    def ask(self, question: str, **extra) -> dict:
        return self.client.chat(question, temperature=0, **extra)

    def correct(self, response_id: str, correction: str, user: str | None = None) -> dict:
        return self.client.feedback(response_id, correction=correction, user=user)

    def consolidate(self, timeout: float = 3600, on_progress=None) -> dict:
        return self.client.consolidate(timeout=timeout, on_progress=on_progress)
