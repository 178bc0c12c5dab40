"""The operator's ICCID inventory in Redis: which profiles are free, which run claimed which, which are used.

Operators receive profile batches from the SM-DP+ vendor with their ICCID lists
and load them (``provisioning esim load FILE``). An Order claims one ICCID
atomically BEFORE its downloadOrder (every run of the Order gets the same one), so a lost answer never leaks a profile:
the repeat orders the same ICCID and reads 8.2.1/3.3 as done.

Keys (``{prefix}`` is the ledger prefix):

- ``{prefix}:esim:free``   set: ICCIDs nobody claimed yet
- ``{prefix}:esim:claims`` hash: the Order's effect key → ICCID, kept once used (a repeat still finds it)
- ``{prefix}:esim:used``   set: ICCIDs whose run activated them (claims not in here are "claimed")
- ``{prefix}:esim:known``  set: every ICCID ever loaded, so that reloading a batch adds nothing twice

Memory: about 200 bytes per ICCID in total (claims and known keep growing with the stock ever loaded).
ICCIDs are stored in canonical form (digits, no ``F`` pad; see :mod:`provisioning.esim.iccid`).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from provisioning.core.logs import get_logger
from provisioning.core.replication import ReplicaUnconfirmed, ReplicaWait
from provisioning.esim.errors import (
    BatchProblem,
    InventoryClaimError,
    InventoryEmpty,
    InventoryFileError,
    InventoryUnavailable,
)
from provisioning.esim.iccid import normalize_iccid

log = get_logger(__name__)

# ICCIDs per Redis call when loading; each chunk is atomic, a reload skips what was added.
LOAD_CHUNK = 1000
CSV_DELIMITERS = ",;\t"
CSV_COLUMN = "iccid"
# Longest value quoted back in a file error (a wrong file could hold anything).
MAX_QUOTED_VALUE = 40

T = TypeVar("T")

_LOAD = """
local added = 0
for i = 1, #ARGV do
  if redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    redis.call('SADD', KEYS[1], ARGV[i])
    added = added + 1
  end
end
return added
"""

# KEYS: free, claims. ARGV: the key. Its own claim first: a repeat gets the same ICCID.
# Returns {ICCID or false, the free ICCIDs left}: the low-stock check costs no round trip of its own.
_CLAIM = """
local iccid = redis.call('HGET', KEYS[2], ARGV[1])
if not iccid then
  iccid = redis.call('SPOP', KEYS[1])
  if iccid then redis.call('HSET', KEYS[2], ARGV[1], iccid) end
end
return {iccid, redis.call('SCARD', KEYS[1])}
"""

# KEYS: free, claims, used. Returns {status, iccid}: status 1 released, 0 no claim, -1 used.
_RELEASE = """
local iccid = redis.call('HGET', KEYS[2], ARGV[1])
if not iccid then return {0, false} end
if redis.call('SISMEMBER', KEYS[3], iccid) == 1 then return {-1, iccid} end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[1], iccid)
return {1, iccid}
"""

# KEYS: free, claims, used.
_STOCK = """
return {redis.call('SCARD', KEYS[1]), redis.call('HLEN', KEYS[2]), redis.call('SCARD', KEYS[3])}
"""


@dataclass(frozen=True)
class Stock:
    free: int
    claimed: int
    used: int

    @property
    def total(self) -> int:
        return self.free + self.claimed + self.used


def parse_batch(source: str | os.PathLike[str]) -> list[str]:
    """The canonical ICCIDs of a batch: ``source`` is a path (``Path``/``PathLike``) or the text itself.

    One ICCID a line, or a vendor CSV with an ``ICCID`` column (any case; delimiter
    ``,`` ``;`` or tab). Blank lines and lines starting with ``#`` are skipped.
    Every malformed or duplicated ICCID is collected; any raise one
    :class:`InventoryFileError` naming each line, and nothing is returned.
    """
    if isinstance(source, str):
        text, name = source, None
    else:
        path = Path(source)
        text, name = _read_text(path), str(path)
    text = text.removeprefix("\ufeff")
    problems: list[BatchProblem] = []
    csv_mode = _is_csv(text)
    rows = _csv_rows(text, problems) if csv_mode else _plain_rows(text)
    iccids: list[str] = []
    first_line: dict[str, int] = {}
    for line, value in rows:
        try:
            iccid = normalize_iccid(value)
        except ValueError as exc:
            reason = str(exc)
            if not csv_mode and any(d in value for d in CSV_DELIMITERS):
                reason = f"{reason}; a CSV batch needs a header line with an ICCID column"
            problems.append(BatchProblem(line, _quote(value), reason))
            continue
        if iccid in first_line:
            problems.append(BatchProblem(line, iccid, f"duplicate of line {first_line[iccid]}"))
            continue
        first_line[iccid] = line
        iccids.append(iccid)
    if problems:
        raise InventoryFileError(sorted(problems, key=lambda p: p.line), source=name)
    return iccids


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InventoryFileError([BatchProblem(line, "", "not UTF-8 text")], source=str(path)) from None


def _meaningful(text: str) -> Iterable[tuple[int, str]]:
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, line


def _is_csv(text: str) -> bool:
    first = next(iter(_meaningful(text)), None)
    if first is None:
        return False
    return any(cell.strip().strip('"').lower() == CSV_COLUMN for cell in _split_any(first[1]))


def _split_any(line: str) -> list[str]:
    for delimiter in CSV_DELIMITERS:
        if delimiter in line:
            return line.split(delimiter)
    return [line]


def _plain_rows(text: str) -> list[tuple[int, str]]:
    return list(_meaningful(text))


def _csv_rows(text: str, problems: list[BatchProblem]) -> list[tuple[int, str]]:
    meaningful = list(_meaningful(text))
    header_line, header = meaningful[0]
    delimiter = next((d for d in CSV_DELIMITERS if d in header), ",")
    columns = [c.strip().lower() for c in next(csv.reader([header], delimiter=delimiter))]
    index = columns.index(CSV_COLUMN)
    rows: list[tuple[int, str]] = []
    for number, line in meaningful[1:]:
        cells = next(csv.reader(io.StringIO(line), delimiter=delimiter))
        if index >= len(cells) or not cells[index].strip():
            problems.append(
                BatchProblem(number, "", f"no value in the ICCID column (header on line {header_line})")
            )
            continue
        rows.append((number, cells[index].strip()))
    return rows


def _quote(value: str) -> str:
    return value if len(value) <= MAX_QUOTED_VALUE else value[:MAX_QUOTED_VALUE] + "..."


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class EsimInventory:
    """Free, claimed and used ICCIDs of one deployment (one key prefix)."""

    def __init__(self, *, redis: Redis, prefix: str, replicas: ReplicaWait | None = None) -> None:
        self._redis = redis
        self.prefix = prefix
        # With replicas, a claim is on a replica before the downloadOrder it guards.
        self._replicas = replicas
        self.free_key = f"{prefix}:esim:free"
        self.claims_key = f"{prefix}:esim:claims"
        self.used_key = f"{prefix}:esim:used"
        self.known_key = f"{prefix}:esim:known"
        self._load = redis.register_script(_LOAD)
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)
        self._stock = redis.register_script(_STOCK)

    def __repr__(self) -> str:
        return f"EsimInventory(prefix={self.prefix!r})"

    def load(self, iccids: Iterable[str]) -> int:
        """Add ICCIDs to the free stock; returns how many were new (known ones are skipped)."""
        canonical: list[str] = []
        for value in iccids:
            try:
                canonical.append(normalize_iccid(value))
            except ValueError as exc:
                raise ValueError(f"malformed ICCID {_quote(value)!r}: {exc}") from None
        added = 0
        for start in range(0, len(canonical), LOAD_CHUNK):
            chunk = canonical[start : start + LOAD_CHUNK]
            added += int(_guard(self._load, keys=[self.free_key, self.known_key], args=chunk))
        log.info("esim_inventory_loaded", given=len(canonical), added=added)
        return added

    def claim(self, key: str) -> str:
        """The ICCID of ``key`` (an Order's effect key): the one claimed before, else a free one taken for it.

        With replicas the claim (a repeat too) returns once a replica holds it, in the same round
        trip; none in time raises InventoryUnavailable (transient: the step retries, ordering nothing).
        """
        return self.claim_counting(key)[0]

    def claim_counting(self, key: str) -> tuple[str, int]:
        """:meth:`claim`, and how many ICCIDs are still free after it (the same round trip)."""
        replicas = self._replicas
        if replicas is not None and _guard(replicas.replicas):
            # EVAL, not EVALSHA: a script cached on a primary that failed over is not on the new one.
            keys = (self.free_key, self.claims_key)
            value, free = _guard(replicas.write, lambda pipe: pipe.eval(_CLAIM, len(keys), *keys, key))[0]
        else:
            value, free = _guard(self._claim, keys=[self.free_key, self.claims_key], args=[key])
        if value is None:
            log.warning("esim_inventory_empty", key=key)
            raise InventoryEmpty()
        return _text(value), int(free)

    def claimed_by(self, key: str) -> str | None:
        value = _guard(self._redis.hget, self.claims_key, key)
        return None if value is None else _text(value)

    def queue_mark_used(self, pipe: Any, iccid: str) -> None:
        """The ICCID a claim returned is activated (idempotent), queued on ``pipe``: an eSIM step's end.

        Used, it never goes back to stock (:meth:`release`); its claim stays, so a repeat still finds it.
        """
        pipe.sadd(self.used_key, iccid)

    def release(self, key: str) -> str | None:
        """Give ``key``'s claimed ICCID back to the free stock; returns it (None: no claim)."""
        status, value = _guard(
            self._release, keys=[self.free_key, self.claims_key, self.used_key], args=[key]
        )
        if int(status) == -1:
            raise InventoryClaimError(
                f"the ICCID of {key}, {_text(value)} is used: it cannot go back to stock"
            )
        if int(status) == 0:
            return None
        log.info("esim_inventory_released", key=key)
        return _text(value)

    def stock(self) -> Stock:
        free, claims, used = _guard(
            self._stock, keys=[self.free_key, self.claims_key, self.used_key], args=[]
        )
        return Stock(free=int(free), claimed=int(claims) - int(used), used=int(used))


def _guard(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one Redis call; Redis errors become inventory errors here and only here."""
    try:
        return call(*args, **kwargs)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise InventoryUnavailable(f"Redis did not answer ({type(exc).__name__})") from exc
    except ReplicaUnconfirmed as exc:
        raise InventoryUnavailable(str(exc)) from exc
