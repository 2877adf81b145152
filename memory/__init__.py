"""Ratchet's memory: SQLite (through sqlite-utils) is the source of truth; FAISS is an index rebuilt from it."""

from memory.db import open_db
from memory.store import Correction, Hit, Memory

__all__ = ["Correction", "Hit", "Memory", "open_db"]
