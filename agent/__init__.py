"""Ratchet's agent: a LangGraph graph retrieve → respond → record over a chat model."""

from agent.graph import Agent, Reply
from agent.protocol import ChatModel, Completion

__all__ = ["Agent", "ChatModel", "Completion", "Reply"]
