"""The listener's state as Redis holds it: who leads the channel, until when, and the checkpoints.

Written by the listener (the leader lock, the checkpoint after each batch, who
took the lead); read by the console and ``provisioning metrics`` (any process, no
listener needed). The leader record (host, pid, since) is kept after the leader
goes, so the console can say who led last. A checkpoint is an opaque replay id,
one per transport: the ids of one never start the other.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import redis
from redis.lock import Lock

from provisioning.core.replay_id import ReplayId, Transport
from provisioning.ledger.keys import Keys

TRANSPORTS = tuple(t.value for t in Transport)


@dataclass(frozen=True)
class ListenerState:
    channel: str
    lock_held: bool
    # Seconds until the lock expires unless the leader renews it (None: no lock).
    lock_expires_in_s: float | None
    # The lock's token, shortened: it tells holders apart, it names no host.
    lock_token: str | None
    # Per transport (pubsub, cometd): the stored checkpoint as --replay-from takes it (CometD the
    # integer, Pub/Sub the hex of its bytes).
    checkpoints: dict[str, str]
    # Who took the lead last, and when (the current leader while the lock is held).
    leader_host: str | None
    leader_pid: int | None
    leader_since: float | None

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


class ListenerStore:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys

    def leader_lock(self, channel: str, ttl_s: int) -> Lock:
        """The channel's leader lock (not taken yet): one active listener per channel."""
        lock: Lock = self._redis.lock(
            self._keys.listener(channel, "lock"), timeout=ttl_s, blocking=False, thread_local=False
        )
        return lock

    def checkpoint(self, channel: str, transport: str) -> bytes | None:
        """The last batch handled on ``transport`` (None: none yet)."""
        stored = self._redis.get(self._keys.listener(channel, f"checkpoint:{transport}"))
        return None if stored is None else _bytes(stored)

    def checkpoints(self, channel: str) -> dict[str, bytes]:
        """Every transport's checkpoint that Redis holds (one round trip), by transport."""
        keys = [self._keys.listener(channel, f"checkpoint:{t}") for t in TRANSPORTS]
        stored = self._redis.mget(keys)
        return {t: _bytes(raw) for t, raw in zip(TRANSPORTS, stored, strict=True) if raw is not None}

    def queue_checkpoint(self, pipe: Any, channel: str, transport: str, position: bytes) -> None:
        """Queue the checkpoint's write on ``pipe`` (a replica may confirm it: see replication)."""
        pipe.set(self._keys.listener(channel, f"checkpoint:{transport}"), position)

    def announce_leader(self, channel: str) -> None:
        """Record this process as the channel's leader (called once it holds the lock)."""
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        self._redis.set(self._keys.listener(channel, "leader"), json.dumps(info))

    def state(self, channel: str) -> ListenerState:
        """One round trip."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(self._keys.listener(channel, "lock"))
        pipe.pttl(self._keys.listener(channel, "lock"))
        for transport in TRANSPORTS:
            pipe.get(self._keys.listener(channel, f"checkpoint:{transport}"))
        pipe.get(self._keys.listener(channel, "leader"))
        token, pttl, *stored, leader = pipe.execute()
        info: dict[str, Any] = {}
        if leader:
            try:
                info = json.loads(leader)
            except ValueError:
                info = {}
        return ListenerState(
            channel=channel,
            lock_held=token is not None,
            lock_expires_in_s=pttl / 1000 if token is not None and pttl and pttl > 0 else None,
            lock_token=_text(token)[:8] if token is not None else None,
            checkpoints={
                t: _replay_text(raw, t) for t, raw in zip(TRANSPORTS, stored, strict=True) if raw is not None
            },
            leader_host=info.get("host"),
            leader_pid=info.get("pid"),
            leader_since=info.get("since"),
        )

    def queue_leader_held(self, pipe: Any, channel: str) -> None:
        """Queue whether a listener holds the channel's lock (for the metrics' one round trip)."""
        pipe.exists(self._keys.listener(channel, "lock"))


def _replay_text(raw: bytes, transport: str) -> str:
    """A checkpoint in its transport's form; the hex of what is stored when it is not one."""
    try:
        return str(ReplayId.from_stored(raw, transport))
    except ValueError:
        return f"unreadable: {bytes(raw)[:64].hex()}"


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
