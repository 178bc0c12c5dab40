"""The listener's state as Redis holds it: who leads the channel, until when, and the checkpoint.

Read by the console and ``provisioning metrics`` (any process, no listener needed);
written by the listener when it takes the lead (:func:`announce_leader`). Keys
(``p`` is ``LEDGER_PREFIX``): ``p:listener:{channel}:lock`` (the leader lock, its
value an opaque token, with expiry), ``...:checkpoint:<transport>`` (the last batch handled,
an opaque replay id per transport: :class:`~provisioning.core.replay_id.ReplayId`'s bytes)
and ``...:leader`` (JSON: host, pid, since; kept after the leader goes, so the
console can say who led last).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from provisioning.core.replay_id import ReplayId, Transport
from provisioning.ledger import Ledger

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


def announce_leader(ledger: Ledger, channel: str) -> None:
    """Record this process as the channel's leader (called once it holds the lock)."""
    info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    ledger.redis.set(ledger.listener_key(channel, "leader"), json.dumps(info))


def read_listener_state(ledger: Ledger, channel: str) -> ListenerState:
    """One round trip."""
    pipe = ledger.redis.pipeline(transaction=False)
    pipe.get(ledger.listener_key(channel, "lock"))
    pipe.pttl(ledger.listener_key(channel, "lock"))
    for transport in TRANSPORTS:
        pipe.get(ledger.listener_key(channel, f"checkpoint:{transport}"))
    pipe.get(ledger.listener_key(channel, "leader"))
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


def _replay_text(raw: bytes, transport: str) -> str:
    """A checkpoint in its transport's form; the hex of what is stored when it is not one."""
    try:
        return str(ReplayId.from_stored(raw, transport))
    except ValueError:
        return f"unreadable: {bytes(raw)[:64].hex()}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
