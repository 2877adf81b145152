"""What the agent needs of a chat model; serving's engines provide it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"


class ChatModel(Protocol):
    def complete(
        self,
        messages: list[dict],
        *,
        adapter: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
    ) -> Completion:
        """Answer `messages` (OpenAI chat format) with the base model, or with the named adapter."""
        ...

    def stream(
        self,
        messages: list[dict],
        *,
        adapter: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
    ) -> Iterator[str | Completion]:
        """As `complete`, but yields the text in pieces as it is generated, then the whole Completion."""
        ...
