"""Our ES2+ client against the SM-DP+ simulator over TLS: each function, each status code, each fault."""

from __future__ import annotations

import re
import socket
from typing import TYPE_CHECKING

import pytest

from provisioning.core.errors import PermanentError, TransientError
from provisioning.core.http import make_pool
from provisioning.core.settings import Settings
from provisioning.esim.client import (
    ConfirmResult,
    Es2PlusClient,
    activation_code,
    matching_id_for,
    smdp_address_from_settings,
)
from provisioning.esim.errors import (
    Es2PlusConnectionError,
    Es2PlusError,
    Es2PlusFunctionFailed,
    Es2PlusFunctionUnavailable,
    Es2PlusProtocolError,
    Es2PlusServerError,
    Es2PlusTlsError,
)

if TYPE_CHECKING:
    from tests.esim.conftest import SmdpSandbox

EID = "89049032123451234512345678901235"
OTHER_EID = "89049032123451234512345678909999"
RUN_ID = "801xx000003GZuGAAW:default"


def settings_for(smdp: SmdpSandbox, smdp_address: str | None = None) -> Settings:
    return Settings(
        _env_file=None,
        smdp_url=smdp.url,
        tls_ca_bundle=smdp.tls.ca_bundle,
        smdp_requester_id=smdp.requester,
        smdp_address=smdp_address,
    )


# -- functions -------------------------------------------------------------------------------


def test_download_order_of_an_explicit_iccid_returns_it_and_allocates_it(
    client: Es2PlusClient, smdp: SmdpSandbox
) -> None:
    _, iccid = smdp.seed(2)
    assert client.download_order(iccid=iccid) == iccid
    profile = smdp.profile(iccid)
    assert (profile["state"], profile["owner"]) == ("allocated", smdp.requester)


def test_download_order_with_an_eid_links_the_profile(client: Es2PlusClient, smdp: SmdpSandbox) -> None:
    [iccid] = smdp.seed(1)
    client.download_order(iccid=iccid, eid=EID)
    assert (smdp.profile(iccid)["state"], smdp.profile(iccid)["eid"]) == ("linked", EID)


def test_download_order_by_profile_type_returns_the_reserved_iccid(
    client: Es2PlusClient, smdp: SmdpSandbox
) -> None:
    [iccid] = smdp.seed(1, profile_type="travel")
    assert client.download_order(profile_type="travel") == iccid


def test_download_order_needs_an_iccid_or_a_profile_type(client: Es2PlusClient) -> None:
    with pytest.raises(ValueError, match="iccid or a profile_type"):
        client.download_order(eid=EID)


def test_every_call_has_its_own_function_call_identifier(client: Es2PlusClient, smdp: SmdpSandbox) -> None:
    iccids = smdp.seed(3)
    for iccid in iccids:
        client.download_order(iccid=iccid)
    calls = smdp.requests("downloadOrder")
    assert [c["requester"] for c in calls] == [smdp.requester] * 3
    assert len({c["call_id"] for c in calls}) == 3


def test_confirm_order_with_our_matching_id_releases_the_profile(
    client: Es2PlusClient, smdp: SmdpSandbox
) -> None:
    [iccid] = smdp.seed(1)
    client.download_order(iccid=iccid, eid=EID)
    matching_id = matching_id_for(RUN_ID)
    result = client.confirm_order(iccid=iccid, matching_id=matching_id, eid=EID)
    assert result == ConfirmResult(matching_id=matching_id, smdp_address="smdp.test.local")
    profile = smdp.profile(iccid)
    assert (profile["state"], profile["matching_id"]) == ("released", matching_id)


def test_confirm_order_without_a_matching_id_returns_the_generated_one(
    client: Es2PlusClient, smdp: SmdpSandbox
) -> None:
    [iccid] = smdp.seed(1)
    client.download_order(iccid=iccid)
    result = client.confirm_order(iccid=iccid, matching_id=None, release=False)
    assert result.matching_id == smdp.profile(iccid)["matching_id"]
    assert smdp.profile(iccid)["state"] == "confirmed"


# -- status codes ----------------------------------------------------------------------------


def test_an_unknown_iccid_is_a_permanent_failure_with_3_9(client: Es2PlusClient, smdp: SmdpSandbox) -> None:
    smdp.seed(1)
    with pytest.raises(Es2PlusFunctionFailed) as failed:
        client.download_order(iccid="8988299000000000006")
    error = failed.value
    assert error.has_code("8.2.1", "3.9")
    assert not error.is_iccid_in_use
    assert (error.function, error.subject_code, error.reason_code) == ("downloadOrder", "8.2.1", "3.9")
    assert isinstance(error, PermanentError)
    assert not isinstance(error, TransientError)
    assert "downloadOrder: Failed 8.2.1/3.9" in str(error)


def test_an_exhausted_profile_type_reports_pool_exhausted(client: Es2PlusClient, smdp: SmdpSandbox) -> None:
    smdp.seed(1)
    client.download_order(profile_type="default")
    with pytest.raises(Es2PlusFunctionFailed) as failed:
        client.download_order(profile_type="default")
    assert failed.value.has_code("8.2.5", "3.7")


def test_another_eid_than_the_linked_one_reports_eid_mismatch(
    client: Es2PlusClient, smdp: SmdpSandbox
) -> None:
    [iccid] = smdp.seed(1)
    client.download_order(iccid=iccid, eid=EID)
    with pytest.raises(Es2PlusFunctionFailed) as failed:
        client.confirm_order(iccid=iccid, matching_id="M-1", eid=OTHER_EID)
    assert failed.value.has_code("8.1.1", "3.10")
    assert failed.value.subject_identifier == OTHER_EID


def test_a_matching_id_of_another_profile_reports_matching_id_in_use(
    client: Es2PlusClient, smdp: SmdpSandbox
) -> None:
    first, second = smdp.seed(2)
    client.download_order(iccid=first)
    client.download_order(iccid=second)
    client.confirm_order(iccid=first, matching_id="SAME")
    with pytest.raises(Es2PlusFunctionFailed) as failed:
        client.confirm_order(iccid=second, matching_id="SAME")
    assert failed.value.has_code("8.2.6", "3.3")


def test_a_repeated_download_order_of_our_iccid_reports_iccid_in_use(
    client: Es2PlusClient, smdp: SmdpSandbox
) -> None:
    [iccid] = smdp.seed(1)
    client.download_order(iccid=iccid)
    with pytest.raises(Es2PlusFunctionFailed) as failed:
        client.download_order(iccid=iccid)
    assert failed.value.is_iccid_in_use
    assert failed.value.subject_identifier == iccid


# -- ambiguous outcomes and faults -------------------------------------------------------------


def test_an_ambiguous_download_order_allocates_and_its_repeat_reports_iccid_in_use(
    client: Es2PlusClient, smdp: SmdpSandbox
) -> None:
    [iccid] = smdp.seed(1)
    smdp.force("downloadOrder", "ambiguous")
    with pytest.raises(Es2PlusConnectionError) as lost:
        client.download_order(iccid=iccid)
    assert isinstance(lost.value, TransientError)
    assert smdp.profile(iccid)["state"] == "allocated"
    with pytest.raises(Es2PlusFunctionFailed) as repeat:
        client.download_order(iccid=iccid)
    assert repeat.value.is_iccid_in_use
    assert smdp.admin("GET", "profiles/summary")["allocated"] == 1


def test_an_ambiguous_confirm_order_confirms_and_its_repeat_reports_invalid_transition(
    client: Es2PlusClient, smdp: SmdpSandbox
) -> None:
    [iccid] = smdp.seed(1)
    client.download_order(iccid=iccid, eid=EID)
    matching_id = matching_id_for(RUN_ID)
    smdp.force("confirmOrder", "ambiguous")
    with pytest.raises(Es2PlusConnectionError):
        client.confirm_order(iccid=iccid, matching_id=matching_id, eid=EID)
    with pytest.raises(Es2PlusFunctionFailed) as repeat:
        client.confirm_order(iccid=iccid, matching_id=matching_id, eid=EID)
    assert repeat.value.is_invalid_transition
    # The profile carries our matchingId: the caller may read 3.5 as done.
    assert smdp.profile(iccid)["matching_id"] == matching_id


def test_a_reset_before_the_answer_is_a_transient_connection_error(
    client: Es2PlusClient, smdp: SmdpSandbox
) -> None:
    [iccid] = smdp.seed(1)
    smdp.force("downloadOrder", "reset")
    with pytest.raises(Es2PlusConnectionError):
        client.download_order(iccid=iccid)
    assert smdp.profile(iccid)["state"] == "available"
    assert client.download_order(iccid=iccid) == iccid


@pytest.mark.parametrize("status", [503, 500, 429])
def test_an_http_error_status_is_transient(client: Es2PlusClient, smdp: SmdpSandbox, status: int) -> None:
    [iccid] = smdp.seed(1)
    smdp.force("downloadOrder", "error", error_status=status)
    with pytest.raises(Es2PlusServerError) as failed:
        client.download_order(iccid=iccid)
    assert failed.value.status_code == status
    assert isinstance(failed.value, TransientError)
    assert not isinstance(failed.value, PermanentError)
    assert smdp.profile(iccid)["state"] == "available"


def test_an_expired_answer_at_http_200_is_transient_and_carries_its_codes(
    client: Es2PlusClient, smdp: SmdpSandbox
) -> None:
    [iccid] = smdp.seed(1)
    smdp.force("downloadOrder", "error", error_status=200)
    with pytest.raises(Es2PlusFunctionUnavailable) as failed:
        client.download_order(iccid=iccid)
    assert isinstance(failed.value, TransientError)
    assert (failed.value.status.status, failed.value.reason_code) == ("Expired", "5.1")
    assert client.download_order(iccid=iccid) == iccid


def test_a_wrong_url_is_a_permanent_protocol_error(smdp: SmdpSandbox) -> None:
    client = Es2PlusClient(
        session=make_pool(smdp.tls.ca_bundle), url=smdp.url + "/elsewhere", requester_id=smdp.requester
    )
    with pytest.raises(Es2PlusProtocolError) as failed:
        client.download_order(iccid="8988299000000000006")
    assert failed.value.status_code == 404
    assert isinstance(failed.value, PermanentError)


def test_a_server_certificate_that_does_not_verify_is_a_permanent_tls_error(smdp: SmdpSandbox) -> None:
    # The default CA bundle (REQUESTS_CA_BUNDLE's, else certifi's: public CAs), which lacks the sandbox CA.
    client = Es2PlusClient(session=make_pool(), url=smdp.url, requester_id=smdp.requester)
    with pytest.raises(Es2PlusTlsError) as failed:
        client.download_order(iccid="8988299000000000006")
    assert isinstance(failed.value, PermanentError)


def test_a_refused_connection_is_transient(smdp: SmdpSandbox) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = Es2PlusClient(
        session=make_pool(smdp.tls.ca_bundle), url=f"https://127.0.0.1:{port}", requester_id=smdp.requester
    )
    with pytest.raises(Es2PlusConnectionError) as failed:
        client.download_order(iccid="8988299000000000006")
    assert isinstance(failed.value, TransientError)
    assert isinstance(failed.value, Es2PlusError)


# -- settings and helpers ----------------------------------------------------------------------


def test_a_client_from_settings_uses_the_configured_ca_bundle(smdp: SmdpSandbox) -> None:
    [iccid] = smdp.seed(1)
    client = Es2PlusClient.from_settings(settings_for(smdp))
    assert client.download_order(iccid=iccid) == iccid
    assert smdp.profile(iccid)["owner"] == smdp.requester


def test_the_smdp_address_falls_back_to_the_host_of_the_url(smdp: SmdpSandbox) -> None:
    assert smdp_address_from_settings(settings_for(smdp)) == "127.0.0.1"
    assert (
        smdp_address_from_settings(settings_for(smdp, smdp_address="smdp.example.com")) == "smdp.example.com"
    )


def test_the_matching_id_of_a_run_is_stable_and_fits_an_activation_code() -> None:
    matching_id = matching_id_for(RUN_ID)
    assert matching_id == matching_id_for(RUN_ID)
    assert matching_id != matching_id_for("801xx000003GZuGAAW:retry-2")
    assert re.fullmatch(r"[0-9A-F]{5}(-[0-9A-F]{5}){3}", matching_id)
    assert activation_code("smdp.example.com", matching_id) == f"LPA:1$smdp.example.com${matching_id}"
