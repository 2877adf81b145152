"""API keys: `rk-<random>` tokens, kept as sha256 hashes, each bound to a user and a role (the
`api_keys` table, serving/migrations.py).

With no live key the server is open (and listens on loopback only); once a key exists every
/v1 route needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from dataclasses import dataclass

import sqlite_utils

from memory import LOCAL_USER
from memory.db import atomic, migrate, now
from serving import migrations as _tables  # noqa: F401  (declares the api_keys table)

ROLES = ("user", "admin")
PREFIX = "rk-"


@dataclass(frozen=True)
class ApiKey:
    id: int
    prefix: str
    user: str
    role: str
    created_at: str
    revoked_at: str | None

    @property
    def live(self) -> bool:
        return self.revoked_at is None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ApiKeys:
    def __init__(self, db: sqlite_utils.Database):
        self.db = db
        migrate(db)

    def create(self, user: str, role: str = "user") -> tuple[ApiKey, str]:
        """A new key; returns it and its token (the only time the token is seen)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        if not user or not user.strip():
            raise ValueError("a key needs a user")
        if user.strip() == LOCAL_USER:
            raise ValueError(f"{LOCAL_USER!r} names the operator of a keyless server; give the key another user")
        token = PREFIX + secrets.token_urlsafe(32)
        with atomic(self.db):
            key_id = self.db["api_keys"].insert(
                {"hash": digest(token), "prefix": token[:8], "user": user.strip(), "role": role,
                 "created_at": now(), "revoked_at": None}
            ).last_pk
        return self.get(key_id), token

    def get(self, key_id: int) -> ApiKey:
        rows = list(self.db["api_keys"].rows_where("id = ?", [key_id]))
        if not rows:
            raise KeyError(f"no API key {key_id}")
        return _key(rows[0])

    def list(self) -> list[ApiKey]:
        return [_key(r) for r in self.db["api_keys"].rows_where(order_by="id")]

    def revoke(self, key_id: int) -> ApiKey:
        key = self.get(key_id)
        if key.live:
            with atomic(self.db):
                self.db["api_keys"].update(key_id, {"revoked_at": now()})
        return self.get(key_id)

    def any_live(self) -> bool:
        return self.db.execute("select 1 from api_keys where revoked_at is null limit 1").fetchone() is not None

    def verify(self, token: str) -> ApiKey | None:
        """The live key for `token`, or None (also for a key an older Ratchet made for the keyless
        operator's name, which would otherwise pass as the operator)."""
        rows = list(self.db["api_keys"].rows_where("hash = ? and revoked_at is null and user != ?",
                                                   [digest(token), LOCAL_USER]))
        return _key(rows[0]) if rows else None


def _key(row: dict) -> ApiKey:
    return ApiKey(id=row["id"], prefix=row["prefix"], user=row["user"], role=row["role"],
                  created_at=row["created_at"], revoked_at=row["revoked_at"])
