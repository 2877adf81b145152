"""Engines answer chats with the base model or a LoRA adapter and load adapters at run time."""

from __future__ import annotations

from typing import Protocol

from agent.protocol import ChatModel


class EngineError(RuntimeError):
    """The engine could not start, crashed, or refused a request."""


class Engine(ChatModel, Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def load_adapter(self, name: str, path: str) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def adapters(self) -> list[str]: ...

    def agreement(self, prompt_ids: list[int], answer_ids: list[int], adapter: str | None = None) -> int: ...


def make_engine(kind: str, model_path: str, settings) -> Engine:
    if kind == "vllm":
        from serving.engines.vllm import VLLMEngine

        engine = VLLMEngine(model_path, settings.vllm, log_path=settings.data_dir / "logs" / "vllm.log")
        if settings.merged_lane:
            from serving.engines.lanes import MergedLanes

            return MergedLanes(engine, model_path, settings.vllm, settings.data_dir / "merged",
                               settings.data_dir / "logs", drain_timeout=settings.vllm.request_timeout)
        return engine
    if kind == "transformers":
        from serving.engines.inprocess import TransformersEngine

        return TransformersEngine(model_path)
    raise ValueError(f"unknown engine {kind!r}: use 'vllm' or 'transformers'")
