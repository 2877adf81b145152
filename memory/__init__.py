"""Ratchet's memory: SQLite (through sqlite-utils) is the source of truth; FAISS is an index rebuilt from it."""

from memory.db import open_db
from memory.store import (
    Correction,
    Hit,
    Memory,
    NotAllowed,
    UnknownFailure,
    UnknownMemory,
    UnknownResponse,
)

__all__ = ["Correction", "Hit", "Memory", "NotAllowed", "UnknownFailure", "UnknownMemory", "UnknownResponse", "open_db"]
