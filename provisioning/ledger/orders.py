"""The Orders' provisionings: what each Order got (its steps' results and effect markers), once.

A provisioning belongs to the Order, not to a run: a second run of the Order
finds the effects done and reuses them. Markers (``x:`` fields) are what the
steps record around their effects: intents before a call, ids after it, the
e-mail's outbox. A deliberate reprovision archives the provisioning and opens
the next generation, whose effect key differs, so its effects are new ones.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import redis

from provisioning.core.run_id import RunId
from provisioning.ledger.keys import Keys
from provisioning.ledger.records import Cancel, Provisioning, decode_provisioning, hash_text, text
from provisioning.ledger.scripts import Scripts

if TYPE_CHECKING:  # high availability: what confirms a guarded write (guard_marker)
    from provisioning.core.replication import ReplicaWait

# The longest e-mail error kept (the Order's field is short anyway).
ERROR_MAX_CHARS = 500

Write = Any


class Orders:
    def __init__(self, client: redis.Redis, keys: Keys, retention_s: int) -> None:
        self._redis = client
        self._keys = keys
        self._scripts = Scripts(client)
        self.retention_s = retention_s

    # -- reading -------------------------------------------------------------------------------
    def provisioning(self, order_id: str) -> Provisioning:
        """The Order's provisioning (empty when the ledger holds none)."""
        return decode_provisioning(order_id, hash_text(self._redis.hgetall(self._keys.order(order_id))))

    def marker(self, order_id: str, name: str) -> str | None:
        raw = self._redis.hget(self._keys.order(order_id), f"x:{name}")
        return text(raw) if raw is not None else None

    def runs(self, order_id: str) -> list[RunId]:
        """Every run of the Order, oldest first."""
        return [RunId.parse(text(m)) for m in self._redis.zrange(self._keys.order_runs(order_id), 0, -1)]

    def in_flight(self, order_id: str) -> list[RunId]:
        """The Order's runs that are queued or running."""
        members = [text(m) for m in self._redis.zrange(self._keys.order_runs(order_id), 0, -1)]
        if not members:
            return []
        scores = self._redis.zmscore(self._keys.active, members)
        return [RunId.parse(m) for m, s in zip(members, scores, strict=True) if s is not None]

    def snapshot(self, order_id: str) -> dict[str, Any]:
        """The Order's fields the steps need, as its run's beginning read them."""
        raw = self._redis.get(self._keys.snapshot(order_id))
        if raw is None:
            raise LookupError(f"Order {order_id} has no snapshot (no run of it is in flight)")
        data: dict[str, Any] = json.loads(raw)
        return data

    # -- markers ---------------------------------------------------------------------------------
    def set_marker(self, order_id: str, name: str, value: str) -> None:
        self._redis.hset(self._keys.order(order_id), f"x:{name}", value)

    def set_markers(self, order_id: str, markers: Mapping[str, str], writes: Sequence[Write] = ()) -> None:
        pipe = self._redis.pipeline(transaction=False)
        self.queue_pending(pipe, order_id, markers, writes)
        if pipe.command_stack:
            pipe.execute()

    def incr_marker(self, order_id: str, name: str) -> int:
        return int(self._redis.hincrby(self._keys.order(order_id), f"x:{name}", 1))

    def guard_marker(self, order_id: str, name: str, value: str, replicas: ReplicaWait) -> None:
        """``set_marker`` confirmed by a replica when there are replicas (see provisioning.core.replication)."""
        replicas.write(lambda pipe: pipe.hset(self._keys.order(order_id), f"x:{name}", value))

    def queue_pending(
        self, pipe: Any, order_id: str, markers: Mapping[str, str] | None, writes: Sequence[Write] = ()
    ) -> None:
        """What a step did before its end or its error, queued first in that round trip."""
        if markers:
            pipe.hset(self._keys.order(order_id), mapping={f"x:{k}": v for k, v in markers.items()})
        for write in writes:
            write(pipe)

    # -- an Order the ledger forgot, and a deliberate second provisioning -------------------------
    def adopt(self, run_id: RunId, results: Mapping[str, dict[str, Any]], markers: Mapping[str, str]) -> None:
        """Record effects found on the Order itself (the ledger forgot them after its retention)."""
        now = time.time()
        mapping: dict[Any, Any] = {
            f"s:{step}": json.dumps({"result": result, "at": now, "run": "adopted from the Order"})
            for step, result in results.items()
        }
        mapping.update({f"x:{k}": v for k, v in markers.items()})
        if mapping:
            self._redis.hset(self._keys.order(run_id.order_id), mapping=mapping)

    def new_generation(self, order_id: str) -> int:
        """Archive the Order's provisioning and open the next one (a deliberate reprovision)."""
        current = self.provisioning(order_id)
        key = self._keys.order(order_id)
        pipe = self._redis.pipeline(transaction=True)
        if self._redis.exists(key):
            archive = self._keys.archive(order_id, current.gen)
            pipe.rename(key, archive)
            pipe.expire(archive, self.retention_s)
        pipe.hset(key, "gen", str(current.gen + 1))
        pipe.execute()
        return current.gen + 1

    # -- the welcome e-mail's outbox ---------------------------------------------------------------
    def email_refused(self, order_id: str, error: str, markers: Mapping[str, str]) -> None:
        """The e-mail was refused for good (``markers``: its outbox says so): the Order goes on the
        operators' undelivered list."""
        pipe = self._redis.pipeline(transaction=True)
        self.queue_pending(pipe, order_id, markers)
        pipe.hset(self._keys.order(order_id), "email_error", error[:ERROR_MAX_CHARS])
        pipe.zadd(self._keys.undelivered, {order_id: time.time()})
        pipe.execute()

    def email_delivered(self, order_id: str, markers: Mapping[str, str] | None = None) -> None:
        """An operator's resend went out; ``markers``: what the send recorded (its outbox)."""
        pipe = self._redis.pipeline(transaction=True)
        self.queue_pending(pipe, order_id, markers)
        pipe.hdel(self._keys.order(order_id), "email_error")
        pipe.zrem(self._keys.undelivered, order_id)
        pipe.execute()

    # -- the Order's cancellation --------------------------------------------------------------------
    def request_cancel(self, order_id: str, reason: str, by: str) -> tuple[bool, Cancel, int]:
        """Record the Order's cancellation once (``request_cancel.lua``): from now on every forward
        step's claim ends its run. Returns (recorded now, the cancellation as recorded, generation)."""
        reply = self._scripts["request_cancel"](
            keys=[self._keys.order(order_id)], args=[repr(time.time()), reason[:ERROR_MAX_CHARS], by]
        )
        new, at, recorded_reason, recorded_by, gen = (text(v) for v in reply)
        return new == "1", Cancel(float(at), recorded_reason, recorded_by), int(gen)
