"""The console's logins, kept in Redis so that a logout, a revocation or the TTL ends them on the server.

A login that lives only in a signed cookie cannot be ended: a copy of the cookie
taken before a logout keeps working until it expires. Here the cookie carries an
opaque random id (``secrets.token_urlsafe(32)``, 256 bits) and nothing else; the
session is a record in Redis that expires ``CONSOLE_SESSION_TTL_S`` after the
login (a fixed end: using the console does not extend it). Logging out deletes
the record, :meth:`ConsoleSessions.revoke_user` deletes every record of a user
(``provisioning console revoke-sessions``), and an id whose record is gone logs
nobody in.

The record is stored under the SHA-256 of the id, never the id itself: whoever
reads Redis (a replica, a backup, an RDB file, ``MONITOR``, an engineer's
``SCAN``) finds no cookie that logs in. With 256 random bits in the id, a plain
hash (no salt, no slow hash) is as strong as the id.

Keys (``p`` is ``LEDGER_PREFIX``; listed with every other key in :mod:`provisioning.ledger.keys`):

===================================  ======  =====================================================
``p:console:session:{sha256(id)}``   string  JSON: user, created_at, expires_at, the session's
                                             data (the CSRF secret); expires at expires_at
``p:console:user:{user}:sessions``   zset    the user's sessions (sha256 of each id), scored by
                                             expires_at: what a revocation deletes; expires with
                                             the user's last session
===================================  ======  =====================================================
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from provisioning.ledger.keys import Keys

# Random bytes in a session id (token_urlsafe: 43 characters).
SESSION_ID_BYTES = 32


@dataclass(frozen=True)
class SessionRecord:
    """One login: who, since when, until when, and what the web layer keeps with it."""

    user: str
    created_at: float
    expires_at: float
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "user": self.user,
                "created_at": self.created_at,
                "expires_at": self.expires_at,
                "data": self.data,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> SessionRecord:
        value = json.loads(raw)
        return cls(value["user"], float(value["created_at"]), float(value["expires_at"]), dict(value["data"]))


class ConsoleSessions:
    """The console's server-side sessions. Thread-safe: it holds only a redis-py client (a pool)."""

    def __init__(
        self, *, redis: redis.Redis, prefix: str, ttl_s: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self.ttl_s = ttl_s
        self._clock = clock

    # -- keys (private: the web layer knows ids, never keys) --------------------------------------
    def _record_key(self, hashed: str) -> str:
        return Keys(self._prefix).console_session(hashed)

    def _index_key(self, user: str) -> str:
        return Keys(self._prefix).console_user_sessions(user)

    @staticmethod
    def _hash(session_id: str) -> str:
        return hashlib.sha256(session_id.encode()).hexdigest()

    # -- the session's life ----------------------------------------------------------------------
    def create(self, user: str, data: Mapping[str, Any] | None = None) -> tuple[str, SessionRecord]:
        """A new session of ``user``: its id (for the cookie, nowhere else) and its record."""
        session_id = secrets.token_urlsafe(SESSION_ID_BYTES)
        now = self._clock()
        record = SessionRecord(user, now, now + self.ttl_s, dict(data or {}))
        hashed = self._hash(session_id)
        index = self._index_key(user)
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._record_key(hashed), record.to_json(), ex=self.ttl_s)
        pipe.zadd(index, {hashed: record.expires_at})
        pipe.zremrangebyscore(index, "-inf", now)  # the user's sessions that have ended by now
        pipe.expire(index, self.ttl_s)
        pipe.execute()
        return session_id, record

    def load(self, session_id: str) -> SessionRecord | None:
        """The session's record; None once it was revoked or has expired."""
        raw = self._redis.get(self._record_key(self._hash(session_id)))
        if raw is None:
            return None
        record = SessionRecord.from_json(raw)
        if record.expires_at <= self._clock():
            # Redis drops it at that moment too; a record past its end is never honoured.
            self.revoke(session_id)
            return None
        return record

    def save(self, session_id: str, record: SessionRecord) -> bool:
        """Store the record's new data, keeping its expiry; False when the session has ended meanwhile
        (a revocation is never undone by a request that was still running)."""
        return bool(
            self._redis.set(self._record_key(self._hash(session_id)), record.to_json(), xx=True, keepttl=True)
        )

    def revoke(self, session_id: str) -> bool:
        """End one session (a logout, a login replacing it); False when it had already ended."""
        hashed = self._hash(session_id)
        raw = self._redis.get(self._record_key(hashed))
        if raw is None:
            return False
        user = SessionRecord.from_json(raw).user
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._record_key(hashed))
        pipe.zrem(self._index_key(user), hashed)
        deleted, _ = pipe.execute()
        return bool(deleted)

    def revoke_user(self, user: str) -> int:
        """End every session of ``user``; how many were still running."""
        index = self._index_key(user)
        now = self._clock()
        pipe: Any
        with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    # WATCHed: a login between the read and the deletion makes this run again, so
                    # no session created meanwhile escapes the revocation.
                    pipe.watch(index)
                    members: list[tuple[bytes, float]] = pipe.zrange(index, 0, -1, withscores=True)
                    pipe.multi()
                    for hashed, _ in members:
                        pipe.delete(self._record_key(_text(hashed)))
                    pipe.delete(index)
                    pipe.execute()
                except redis.WatchError:
                    continue
                return sum(1 for _, expires_at in members if expires_at > now)

    def running(self, user: str) -> int:
        """How many sessions of ``user`` have not ended."""
        return int(self._redis.zcount(self._index_key(user), f"({self._clock()}", "+inf"))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
