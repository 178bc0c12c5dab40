"""The console's server-side sessions on the real Redis: found by id, ended by logout, revocation or TTL."""

from __future__ import annotations

from dataclasses import replace

import pytest

from provisioning.ledger.console_sessions import ConsoleSessions

pytestmark = pytest.mark.fast

TTL_S = 3600


@pytest.fixture
def sessions(redis_client, namespace, clock) -> ConsoleSessions:
    return ConsoleSessions(redis=redis_client, prefix=namespace, ttl_s=TTL_S, clock=clock)


def _stored(redis_client, namespace) -> dict[bytes, bytes]:
    """Every key the namespace holds, with its value as text (whatever the type)."""
    found = {}
    for key in redis_client.scan_iter(f"{namespace}:*"):
        kind = redis_client.type(key)
        if kind == b"string":
            found[key] = redis_client.get(key)
        elif kind == b"zset":
            found[key] = b" ".join(redis_client.zrange(key, 0, -1))
    return found


def test_a_session_is_found_by_its_id_and_the_id_is_stored_nowhere_in_redis(
    sessions, redis_client, namespace, clock
):
    session_id, _ = sessions.create("olivia", {"csrf_token": "abc"})
    found = sessions.load(session_id)
    assert found is not None
    assert (found.user, found.data) == ("olivia", {"csrf_token": "abc"})
    assert found.expires_at == clock.now + TTL_S
    assert len(session_id) == 43
    stored = _stored(redis_client, namespace)
    assert stored, "the session was not stored"
    assert all(session_id.encode() not in key + value for key, value in stored.items())
    assert sessions.load(session_id[:-1] + ("A" if session_id[-1] != "A" else "B")) is None


def test_every_key_of_a_session_expires_on_the_server_within_the_ttl(sessions, redis_client, namespace):
    sessions.create("olivia")
    keys = list(redis_client.scan_iter(f"{namespace}:*"))
    assert len(keys) == 2  # the record and the user's index
    assert all(0 < redis_client.ttl(key) <= TTL_S for key in keys)


def test_a_session_past_its_ttl_is_not_honoured_and_is_deleted(sessions, redis_client, namespace, clock):
    session_id, _ = sessions.create("olivia")
    clock.advance(TTL_S - 1)
    assert sessions.load(session_id) is not None
    clock.advance(1)
    assert sessions.load(session_id) is None
    assert sessions.running("olivia") == 0
    assert not any(
        k.startswith(f"{namespace}:console:session:".encode()) for k in _stored(redis_client, namespace)
    )


def test_a_revoked_session_is_gone_and_saving_it_afterwards_does_not_bring_it_back(sessions):
    session_id, record = sessions.create("olivia")
    other_id, _ = sessions.create("olivia")
    assert sessions.revoke(session_id) is True
    assert sessions.load(session_id) is None
    assert sessions.save(session_id, record) is False  # a request still running when it was revoked
    assert sessions.load(session_id) is None
    assert sessions.revoke(session_id) is False
    assert sessions.load(other_id) is not None
    assert sessions.running("olivia") == 1


def test_revoke_user_ends_every_session_of_the_user_and_only_theirs(sessions):
    olivias = [sessions.create("olivia")[0] for _ in range(3)]
    victors = sessions.create("victor")[0]
    assert sessions.running("olivia") == 3
    assert sessions.revoke_user("olivia") == 3
    assert all(sessions.load(sid) is None for sid in olivias)
    assert sessions.running("olivia") == 0
    assert sessions.load(victors) is not None
    assert sessions.revoke_user("olivia") == 0


def test_saving_keeps_the_sessions_end(sessions, clock):
    session_id, record = sessions.create("olivia")
    clock.advance(60)
    loaded = sessions.load(session_id)
    assert loaded is not None
    assert sessions.save(session_id, replace(loaded, data={"k": "v"}))
    again = sessions.load(session_id)
    assert again is not None
    assert (again.data, again.expires_at) == ({"k": "v"}, record.expires_at)
