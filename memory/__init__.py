"""Ratchet's memory: SQLite (through sqlite-utils) is the source of truth; FAISS is an index rebuilt from it."""

from memory.corrections import (
    ADAPTER_SCOPE,
    LOCAL_USER,
    RELEVANCE_THRESHOLD,
    Correction,
    Hit,
    NotAllowed,
    UnknownMemory,
)
from memory.db import open_db
from memory.failures import UnknownFailure
from memory.interactions import UnknownResponse
from memory.store import Memory

__all__ = ["ADAPTER_SCOPE", "LOCAL_USER", "RELEVANCE_THRESHOLD", "Correction", "Hit", "Memory", "NotAllowed",
           "UnknownFailure", "UnknownMemory", "UnknownResponse", "open_db"]
