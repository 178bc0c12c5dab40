"""The released profiles' states: each ES2+ notification recorded once, the state machine in one script."""

from __future__ import annotations

import pytest

from provisioning.ledger.esim_status import EsimState, NotificationOutcome
from provisioning.runs.services import Services

pytestmark = pytest.mark.fast

ORDER = "801Dn0000HeJ6rrIQC"
ICCID = "8988299000000000016"
T0 = 1_800_000_000_000  # ms

DOWNLOAD, INSTALL = 3, 4


@pytest.fixture
def services(settings):
    svc = Services(settings)
    yield svc
    svc.redis.close()


def release(services: Services, iccid: str = ICCID) -> None:
    pipe = services.redis.pipeline()
    services.ledger.esim_status.queue_released(pipe, iccid, ORDER, ORDER)
    pipe.execute()


def test_a_notification_for_an_iccid_no_order_released_is_unknown_and_counted(services: Services) -> None:
    noted = services.ledger.esim_status.note(
        ICCID, DOWNLOAD, T0, "Executed-Success", EsimState.DOWNLOADED, ""
    )
    assert noted.outcome is NotificationOutcome.UNKNOWN
    assert services.ledger.esim_status.get(ICCID) is None
    counters = services.ledger.metrics.parse(_read(services)).counter("esim_notifications")
    assert counters == {(("outcome", "unknown"),): 1.0}


def test_released_then_downloaded_then_installed_each_once_with_the_orders_write_queued(
    services: Services,
) -> None:
    store = services.ledger.esim_status
    release(services)
    release(services)  # a repeat of the eSIM step changes nothing
    assert store.counts()["released"] == 1
    first = store.note(ICCID, DOWNLOAD, T0, "Executed-Success", EsimState.DOWNLOADED, "")
    assert (first.outcome, first.state, first.order_id) == (
        NotificationOutcome.CHANGED,
        EsimState.DOWNLOADED,
        ORDER,
    )
    again = store.note(ICCID, DOWNLOAD, T0, "Executed-Success", EsimState.DOWNLOADED, "")
    assert again.outcome is NotificationOutcome.DUPLICATE
    store.note(ICCID, INSTALL, T0 + 5000, "Executed-Success", EsimState.INSTALLED, "")
    status = store.get(ICCID)
    assert status is not None
    assert status.state is EsimState.INSTALLED
    assert [n[:2] for n in status.notifications] == [(DOWNLOAD, T0), (INSTALL, T0 + 5000)]
    assert store.counts() == {"released": 0, "downloaded": 0, "installed": 1, "error": 0, "cancelled": 0}
    assert [iccid for iccid, _ in store.writebacks()] == [ICCID]
    assert store.pending(released_before=2e10) == []


def test_out_of_order_arrivals_end_in_the_state_of_the_newest(services: Services) -> None:
    store = services.ledger.esim_status
    release(services)
    # Installation arrives before the download that preceded it: the download changes nothing.
    assert store.note(ICCID, INSTALL, T0 + 9000, "Executed-Success", EsimState.INSTALLED, "").outcome is (
        NotificationOutcome.CHANGED
    )
    late = store.note(ICCID, DOWNLOAD, T0, "Executed-Success", EsimState.DOWNLOADED, "")
    assert (late.outcome, late.state) == (NotificationOutcome.RECORDED, EsimState.INSTALLED)
    # An error older than the installation does not undo it.
    old_error = store.note(ICCID, DOWNLOAD, T0 + 1, "Failed", EsimState.ERROR, "8.2/3.8 download failed")
    assert old_error.state is EsimState.INSTALLED


def test_a_download_error_then_a_newer_success_and_the_reason_kept_only_while_in_error(
    services: Services,
) -> None:
    store = services.ledger.esim_status
    release(services)
    store.note(ICCID, DOWNLOAD, T0, "Failed", EsimState.ERROR, "download failed on the device")
    failed = store.get(ICCID)
    assert failed is not None
    assert (failed.state, failed.reason) == (
        EsimState.ERROR,
        "download failed on the device",
    )
    store.note(ICCID, DOWNLOAD, T0 + 60_000, "Executed-Success", EsimState.DOWNLOADED, "")
    retried = store.get(ICCID)
    assert retried is not None
    assert (retried.state, retried.reason) == (EsimState.DOWNLOADED, None)


def test_a_download_error_stamped_before_our_release_still_puts_the_profile_in_error(
    services: Services,
) -> None:
    # The SM-DP+'s clock stamps the notification, ours the release: a device that fails at once is
    # notified before the eSIM step has recorded the release, so its timestamp is the older one.
    store = services.ledger.esim_status
    release(services)
    released = store.get(ICCID)
    assert released is not None
    before_release_ms = int(released.released_at * 1000) - 5
    store.note(ICCID, DOWNLOAD, before_release_ms, "Failed", EsimState.ERROR, "download failed")
    failed = store.get(ICCID)
    assert failed is not None
    assert (failed.state, failed.reason) == (EsimState.ERROR, "download failed")


def test_a_cancelled_profile_stays_cancelled_and_leaves_the_pending_list(services: Services) -> None:
    store = services.ledger.esim_status
    release(services)
    assert [p.iccid for p in store.pending(released_before=2e10)] == [ICCID]
    assert store.cancelled(ICCID) is True
    assert store.cancelled(ICCID) is False
    late = store.note(ICCID, DOWNLOAD, T0, "Executed-Success", EsimState.DOWNLOADED, "")
    assert late.state is EsimState.CANCELLED
    assert store.pending(released_before=2e10) == []
    assert store.counts()["cancelled"] == 1


def test_a_writeback_is_done_only_for_the_change_it_wrote(services: Services) -> None:
    store = services.ledger.esim_status
    release(services)
    store.note(ICCID, DOWNLOAD, T0, "Executed-Success", EsimState.DOWNLOADED, "")
    [(iccid, score)] = store.writebacks()
    assert store.written(iccid, score - 1) is False
    assert store.written(iccid, score) is True
    assert store.writebacks() == []


def _read(services: Services) -> list:
    pipe = services.redis.pipeline()
    services.ledger.metrics.read_commands(pipe)
    return pipe.execute()
