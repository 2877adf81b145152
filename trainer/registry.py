"""The adapter registry: every version a plain PEFT folder plus a row in SQLite.

Each folder also carries `ratchet.json` — parent version, training data, metrics, verdict,
timings — so a folder explains itself without the database.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import sqlite_utils

from memory.db import atomic, migrate, now
from trainer import migrations as _tables  # noqa: F401  (declares the cycles and adapters tables)

MANIFEST = "ratchet.json"


class AdapterStatus(StrEnum):
    """What became of a version: a str, so the stored strings and the HTTP API are these values."""

    CANDIDATE = "candidate"  # trained and registered; not (yet) served
    PROMOTED = "promoted"  # served as `ratchet` at some point; may be activated again
    REJECTED = "rejected"  # failed the gate; never served


@dataclass(frozen=True)
class AdapterVersion:
    version: int
    path: str
    parent: int | None
    cycle_id: int | None
    status: AdapterStatus
    active: bool
    created_at: str
    metrics: dict

    @property
    def name(self) -> str:
        return adapter_name(self.version)


def adapter_name(version: int) -> str:
    return f"ratchet-v{version}"


class AdapterRegistry:
    """The versions and which one is active; the one owner of both. The active version is also
    kept in memory (read here, changed by `activate`), so asking for it costs no query."""

    def __init__(self, db: sqlite_utils.Database, root: str | Path):
        self.db = db
        migrate(db)
        self.root = Path(root).resolve()  # absolute: an engine in another working directory loads from it
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # a change to the database and the copy in memory is one step
        self._active = self._read_active()

    def folder_for(self, version: int) -> Path:
        return self.root / f"v{version:04d}"

    def next_version(self) -> int:
        row = self.db.execute("select max(version) from adapters").fetchone()
        on_disk = [int(p.name[1:]) for p in self.root.glob("v[0-9]*") if p.name[1:].isdigit()]
        return max([row[0] or 0, *on_disk]) + 1

    def register(self, version: int, *, parent: int | None, cycle_id: int | None, manifest: dict,
                 status: AdapterStatus = AdapterStatus.CANDIDATE) -> AdapterVersion:
        """Record a trained folder with its verdict (a candidate, or rejected by the gate): its
        manifest is written into the folder and flushed to disk first, then the row is committed,
        so a registered version always explains itself."""
        status = AdapterStatus(status)
        if status not in (AdapterStatus.CANDIDATE, AdapterStatus.REJECTED):
            raise ValueError(f"a version is registered as a candidate or rejected, not {status}; activate() promotes")
        path = self.folder_for(version)
        if not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"{path} holds no PEFT adapter")
        manifest = {"version": version, "name": adapter_name(version), "parent": parent, "cycle_id": cycle_id,
                    "created_at": now(), **manifest}
        for file in path.iterdir():  # the adapter's own files reach the disk before it can be served
            if file.is_file():
                _fsync(file)
        _write_durably(path / MANIFEST, json.dumps(manifest, indent=2, default=str))
        with atomic(self.db):
            self.db["adapters"].insert(
                {
                    "version": version,
                    "name": adapter_name(version),
                    "path": str(path),
                    "parent": parent,
                    "cycle_id": cycle_id,
                    "status": status.value,
                    "active": 0,
                    "created_at": manifest["created_at"],
                    "metrics": json.dumps(manifest.get("metrics", {})),
                }
            )
        return self.get(version)

    def discard(self, version: int) -> None:
        """Remove a folder that never got registered (a crashed cycle's leftovers)."""
        shutil.rmtree(self.folder_for(version), ignore_errors=True)

    def get(self, version: int) -> AdapterVersion:
        rows = list(self.db["adapters"].rows_where("version = ?", [version]))
        if not rows:
            raise KeyError(f"no adapter version {version}")
        return self._version(rows[0])

    def versions(self) -> list[AdapterVersion]:
        return [self._version(r) for r in self.db["adapters"].rows_where(order_by="version")]

    def active(self) -> AdapterVersion | None:
        """The version served as `ratchet` (None: the base model), from memory."""
        return self._active

    def set_status(self, version: int, status: AdapterStatus | str) -> None:
        """Change a registered version's status by hand (fixtures and benchmarks that register
        versions of their own; cycles register with the final status, and `activate` promotes)."""
        status = AdapterStatus(status)
        with self._lock:
            with atomic(self.db):
                self.db["adapters"].update(version, {"status": status.value})
            self._active = self._read_active()

    def activate(self, version: int | None) -> None:
        """Make `version` the one served as `ratchet` and mark it promoted (None: the base model),
        in one transaction."""
        with self._lock:
            with atomic(self.db):
                self.db.execute("update adapters set active = 0 where active = 1")
                if version is not None:
                    self.db.execute("update adapters set active = 1, status = ? where version = ?",
                                    [AdapterStatus.PROMOTED.value, version])
            self._active = self._read_active()

    def _read_active(self) -> AdapterVersion | None:
        rows = list(self.db["adapters"].rows_where("active = 1"))
        return self._version(rows[0]) if rows else None

    def _version(self, row: dict) -> AdapterVersion:
        """A version as the `adapters` table stores it, its folder under this registry's root: the
        stored path is where it was written, which a moved or copied data directory no longer is."""
        plain = {k: row[k] for k in ("version", "parent", "cycle_id", "created_at")}
        return AdapterVersion(**plain, path=str(self.folder_for(row["version"])), status=AdapterStatus(row["status"]),
                              active=bool(row["active"]), metrics=json.loads(row["metrics"] or "{}"))


def _write_durably(path: Path, text: str) -> None:
    """Write `path` whole or not at all, and flush it to disk before returning."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file's contents, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
