"""Engines answer chats with the base model or a LoRA adapter and load adapters at run time.

Every engine implements the whole `Engine` protocol; what differs between them is declared in
`Capabilities`, never probed. Engine kinds are the `ENGINES` table: a new engine is a module and
one row there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from agent.protocol import ChatModel


class EngineError(RuntimeError):
    """The engine could not start, crashed, or refused a request."""


@dataclass(frozen=True)
class Capabilities:
    adapter_agreement: bool = True  # token agreement (teacher-forced) with an adapter, not only the base model
    merged_lane: bool = False  # serves the active adapter merged into the weights too (`follow` builds it)


class Engine(ChatModel, Protocol):
    name: str
    capabilities: Capabilities

    def start(self) -> None:
        """Start serving; returns once requests can be answered."""

    def stop(self) -> None:
        """Stop, leaving no process behind; harmless when stopped."""

    def restart(self) -> None:
        """After a crash: start again with the adapters it had."""

    def alive(self) -> bool:
        """Can it still answer? False makes the server restart it."""

    def load_adapter(self, name: str, path: str) -> None:
        """Load the PEFT folder `path` under `name` (already loaded: nothing happens)."""

    def unload_adapter(self, name: str) -> None: ...

    def adapters(self) -> list[str]:
        """The names of the adapters loaded now."""

    def agreement(self, prompt_ids: list[int], answer_ids: list[int], adapter: str | None = None) -> int:
        """How many of `answer_ids` the model predicts as its top token, teacher-forced after `prompt_ids`."""

    def follow(self, adapter: str | None, path: str | None) -> None:
        """The active adapter is now `adapter` (None: the base model); an engine may prepare for it."""

    def prepare(self, adapter: str | None, path: str | None) -> None:
        """A candidate that may become active soon (its gate is running); an engine may get ready
        to serve it. None: there is no candidate any more."""

    def status(self) -> dict:
        """Engine-specific facts for /health (e.g. its merged lanes); {} when there are none."""


def _vllm(model_path: str, settings) -> Engine:
    from serving.engines.vllm import VLLMEngine

    engine = VLLMEngine(model_path, settings.vllm, log_path=settings.data_dir / "logs" / "vllm.log")
    if not settings.merged_lane:
        return engine
    from serving.engines.lanes import MergedLanes

    return MergedLanes(engine, model_path, settings.vllm, settings.data_dir / "merged", settings.data_dir / "logs",
                       drain_timeout=settings.vllm.request_timeout)


def _transformers(model_path: str, settings) -> Engine:
    from serving.engines.inprocess import TransformersEngine

    return TransformersEngine(model_path)


# Engine kinds by the name `--engine` / RATCHET_ENGINE takes; each builds an engine from the model and the settings.
ENGINES: dict[str, Callable[[str, object], Engine]] = {"vllm": _vllm, "transformers": _transformers}


def make_engine(kind: str, model_path: str, settings) -> Engine:
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}: use one of {', '.join(ENGINES)}")
    return ENGINES[kind](model_path, settings)
