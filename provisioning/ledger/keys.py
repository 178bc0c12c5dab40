"""Every Redis key the ledger writes, named in this one place (private to the ledger package).

Every key lives under the ``LEDGER_PREFIX`` namespace (``p`` below):

===================================  ======  ==================================================
key                                  type    holds
===================================  ======  ==================================================
``p:run:{run_id}``                   hash    state, origin, timestamps, outcome; per step:
                                             attempts (``a:``), last error (``e:``), the run's
                                             own step results (``s:``), markers (``x:``)
``p:order:{order_id}``               hash    the Order's provisioning: generation, the run
                                             acting on it, step results, effect markers
                                             (intents, ICCID, outbox), the e-mail error, its
                                             cancellation (``cancel_at``, ``cancel_reason``,
                                             ``cancel_by``: request_cancel.lua)
``p:order:{order_id}:runs``          zset    every run of the Order, scored by creation time
``p:order:{order_id}:snapshot``      string  JSON of the Order fields the steps need
                                             (personal data: deleted when the run is done)
``p:order:{order_id}:g{n}``          hash    provisioning ``n`` after ``provisioning reprovision``
``p:lease:{order_id}``               string  the lease holder's token, with expiry
``p:active``                         zset    unfinished runs, scored by last update (reconciler)
``p:failed``                         zset    failed runs, scored by failure time
``p:writeback``                      zset    failed runs whose Order may not show Failed yet (the
                                             reconciler writes it), scored by failure time
``p:undelivered``                    zset    Orders whose welcome e-mail was refused, by time
``p:quarantine``                     list    JSON of events the listener rejected (newest first)
``p:runs``                           zset    every run that began or ended, scored by when (the
                                             operators' list of runs; trimmed after the retention)
``p:metrics:counters``               hash    run metrics: ``<name>|<labels>`` → count
``p:metrics:h:{name}``               hash    a histogram: ``<label>|<bucket>`` → count, ``|sum``
``p:metrics:activating``             hash    what the last backfill sweep saw in Salesforce
``p:listener:{channel}:lock``        string  the leader lock's token, with expiry
``p:listener:{channel}:checkpoint:{transport}``  string  the last batch handled (opaque replay id)
``p:listener:{channel}:leader``      string  JSON: who took the lead last (host, pid, since)
``p:esim:free``                      set     ICCIDs nobody claimed yet
``p:esim:claims``                    hash    the Order's effect key → its ICCID (kept once used)
``p:esim:used``                      set     ICCIDs whose run activated them
``p:esim:known``                     set     every ICCID ever loaded (a reload adds nothing twice)
``p:limits:{system}:breaker``       hash    an external system's circuit: state, failures in a
                                             row, openings in a row, open until (ms)
``p:limits:{system}:probe``         string  who probes a half-open circuit, with expiry
``p:limits:{system}:calls``         zset    the system's calls in its rate window, by when (ms)
``p:limits:{system}:slots``         zset    steps the rate limit turned away → when to come back
                                             (ms); member '' is the last slot given out
``p:limits:salesforce:api``         hash    Salesforce's API usage as its last answer said it
``p:esim:status:{iccid}``            hash    a released profile's state (esim_status.py): the Order,
                                             its claim key, state, reason, when; ``n:{point}:{ms}``
                                             per ES2+ notification recorded (the dedupe)
``p:esim:pending``                   zset    profiles released and not installed, by release time
``p:esim:writeback``                 zset    ICCIDs whose Order does not show their state yet
``p:esim:states``                    hash    profiles per state → count
``p:console:session:{sha256(id)}``   string  JSON of a console session (user, created_at, expires_at,
                                             data); expires with the session
``p:console:user:{user}:sessions``   zset    the user's hashed session ids by expiry (what a
                                             revocation deletes)
``p:console:login:user:{user}``      hash    failed logins of a user: failures, last_ms, until_ms
``p:console:login:address:{addr}``   hash    the same, for one client address
===================================  ======  ==================================================
"""

from __future__ import annotations

from provisioning.core.run_id import RunId


class Keys:
    """The key names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        p = prefix
        self.active = f"{p}:active"
        self.failed = f"{p}:failed"
        self.writeback = f"{p}:writeback"
        self.undelivered = f"{p}:undelivered"
        self.quarantine = f"{p}:quarantine"
        self.runs = f"{p}:runs"
        self.metrics_counters = f"{p}:metrics:counters"
        self.metrics_activating = f"{p}:metrics:activating"
        self.esim_free = f"{p}:esim:free"
        self.esim_claims = f"{p}:esim:claims"
        self.esim_used = f"{p}:esim:used"
        self.esim_known = f"{p}:esim:known"
        self.esim_pending = f"{p}:esim:pending"
        self.esim_writeback = f"{p}:esim:writeback"
        self.esim_states = f"{p}:esim:states"

    def run(self, run_id: RunId | str) -> str:
        return f"{self.prefix}:run:{run_id}"

    def order(self, order_id: str) -> str:
        return f"{self.prefix}:order:{order_id}"

    def order_runs(self, order_id: str) -> str:
        return f"{self.prefix}:order:{order_id}:runs"

    def snapshot(self, order_id: str) -> str:
        return f"{self.prefix}:order:{order_id}:snapshot"

    def archive(self, order_id: str, gen: int) -> str:
        return f"{self.prefix}:order:{order_id}:g{gen}"

    def esim_status(self, iccid: str) -> str:
        return f"{self.prefix}:esim:status:{iccid}"

    def lease(self, order_id: str) -> str:
        return f"{self.prefix}:lease:{order_id}"

    def histogram(self, name: str) -> str:
        return f"{self.prefix}:metrics:h:{name}"

    def listener(self, channel: str, what: str) -> str:
        return f"{self.prefix}:listener:{channel}:{what}"

    def limit(self, system: str, what: str) -> str:
        return f"{self.prefix}:limits:{system}:{what}"

    def console_session(self, hashed_id: str) -> str:
        return f"{self.prefix}:console:session:{hashed_id}"

    def console_user_sessions(self, user: str) -> str:
        return f"{self.prefix}:console:user:{user}:sessions"

    def login(self, scope: str, value: str) -> str:
        return f"{self.prefix}:console:login:{scope}:{value}"

    def end_run(self, run_id: RunId) -> list[str]:
        """KEYS of end_run.lua, in its order."""
        order_id = run_id.order_id
        return [
            self.run(run_id),
            self.order(order_id),
            self.order_runs(order_id),
            self.snapshot(order_id),
            self.active,
            self.failed,
            self.writeback,
            self.runs,
        ]
