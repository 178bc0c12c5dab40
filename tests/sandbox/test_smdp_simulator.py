"""The SM-DP+ simulator's ES2+ contract, driven with plain requests over HTTPS."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from provisioning.core.iccid import is_valid_iccid
from provisioning.sandbox.common import SandboxTLS, ServerThread
from provisioning.sandbox.smdp import SmdpSimulator

PROTOCOL = {"X-Admin-Protocol": "gsma/rsp/v2.5.0"}
EID = "89049032123451234512345678901235"
OTHER_EID = "89049032123451234512345678909999"
REQUESTER = "operator-a"
IN_USE = ("8.2.1", "3.3")
INVALID_TRANSITION = ("8.2.1", "3.5")
MATCHING_ID_IN_USE = ("8.2.6", "3.3")
NOT_AUTHORIZED = ("8.2.1", "1.2")


class Smdp:
    def __init__(self, sim: SmdpSimulator, thread: ServerThread, session: requests.Session) -> None:
        self.sim, self.thread, self.session = sim, thread, session
        self.base = thread.url("smdp")

    def raw(self, function: str, body: Any, headers: dict[str, str] | None = None) -> requests.Response:
        return self.session.post(
            f"{self.base}/gsma/rsp2/es2plus/{function}",
            json=body,
            headers=PROTOCOL if headers is None else headers,
            timeout=5,
        )

    def call(self, function: str, requester: str = REQUESTER, **fields: Any) -> dict[str, Any]:
        header = {"functionRequesterIdentifier": requester, "functionCallIdentifier": str(uuid.uuid4())}
        response = self.raw(function, {"header": header, **fields})
        assert response.status_code == 200
        assert response.headers["X-Admin-Protocol"].startswith("gsma/rsp/v2.")
        assert response.headers["Content-Type"].startswith("application/json")
        return response.json()  # type: ignore[no-any-return]

    def admin(self, method: str, path: str, body: Any = None, **params: str) -> requests.Response:
        return self.session.request(
            method, f"{self.base}/__admin/{path}", json=body, params=params, timeout=5
        )

    def seed(
        self, count: int = 0, iccids: list[str] | None = None, profile_type: str = "default"
    ) -> list[str]:
        body: dict[str, Any] = {"profile_type": profile_type}
        body.update({"iccids": iccids} if iccids is not None else {"count": count})
        response = self.admin("POST", "profiles", body)
        assert response.status_code == 200, response.text
        return response.json()["iccids"]  # type: ignore[no-any-return]

    def profile(self, iccid: str) -> dict[str, Any]:
        response = self.admin("GET", f"profiles/{iccid}")
        assert response.status_code == 200
        return response.json()  # type: ignore[no-any-return]

    def faults(self, **settings: Any) -> None:
        assert self.admin("POST", "faults", settings).status_code == 200


def status(answer: dict[str, Any]) -> str:
    return answer["header"]["functionExecutionStatus"]["status"]  # type: ignore[no-any-return]


def codes(answer: dict[str, Any]) -> tuple[str, str]:
    execution = answer["header"]["functionExecutionStatus"]
    assert execution["status"] == "Failed"
    data = execution["statusCodeData"]
    assert data["message"]
    return data["subjectCode"], data["reasonCode"]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> SandboxTLS:
    return SandboxTLS.create(tmp_path_factory.mktemp("smdp-tls"))


@pytest.fixture
def smdp(tls: SandboxTLS) -> Iterator[Smdp]:
    sim = SmdpSimulator(seed=3)
    thread = ServerThread(ssl_context=tls.server_context)
    thread.add_app("smdp", sim.build_app())
    thread.start()
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would override verify
    session.verify = str(tls.ca_bundle)
    yield Smdp(sim, thread, session)
    session.close()
    thread.stop()


# -- transport -------------------------------------------------------------------------------


def test_a_call_without_x_admin_protocol_is_refused_with_http_400(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    header = {"functionRequesterIdentifier": REQUESTER, "functionCallIdentifier": "1"}
    response = smdp.raw("downloadOrder", {"header": header, "iccid": iccid}, headers={})
    assert response.status_code == 400
    assert codes(response.json()) == ("1.1", "2.2")
    assert smdp.profile(iccid)["state"] == "available"


def test_a_call_without_the_request_header_fails_and_changes_nothing(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    response = smdp.raw("downloadOrder", {"iccid": iccid})
    assert response.status_code == 200
    assert codes(response.json()) == ("1.1", "2.2")
    response = smdp.raw("downloadOrder", ["not", "an", "object"])
    assert codes(response.json()) == ("1.1", "2.1")
    assert smdp.profile(iccid)["state"] == "available"


def test_env_points_a_client_at_the_simulator(smdp: Smdp) -> None:
    assert smdp.sim.env(smdp.base) == {"SMDP_URL": smdp.base, "SMDP_ADDRESS": "smdp.sandbox.local"}


# -- downloadOrder ---------------------------------------------------------------------------


def test_download_order_by_profile_type_reserves_the_next_available_profile(smdp: Smdp) -> None:
    first, second = smdp.seed(2)
    answer = smdp.call("downloadOrder", profileType="default")
    assert status(answer) == "Executed-Success"
    assert answer["iccid"] == first
    assert smdp.profile(first)["state"] == "allocated"
    assert smdp.profile(first)["owner"] == REQUESTER
    assert smdp.call("downloadOrder", profileType="default", eid=EID)["iccid"] == second
    assert smdp.profile(second)["state"] == "linked"
    assert smdp.profile(second)["eid"] == EID


def test_download_order_of_an_explicit_iccid_reserves_it_once(smdp: Smdp) -> None:
    _, iccid = smdp.seed(2)
    assert smdp.call("downloadOrder", iccid=iccid)["iccid"] == iccid
    assert codes(smdp.call("downloadOrder", iccid=iccid)) == IN_USE
    assert smdp.profile(iccid)["state"] == "allocated"


def test_download_order_accepts_an_f_padded_iccid(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    assert smdp.call("downloadOrder", iccid=iccid + "F")["iccid"] == iccid


def test_download_order_of_an_unknown_iccid_answers_3_9(smdp: Smdp) -> None:
    smdp.seed(1)
    assert codes(smdp.call("downloadOrder", iccid="8988299000000000006")) == ("8.2.1", "3.9")
    assert codes(smdp.call("downloadOrder", iccid="not-an-iccid")) == ("8.2.1", "3.9")


def test_download_order_of_an_exhausted_profile_type_answers_8_2_5_3_7(smdp: Smdp) -> None:
    smdp.seed(1, profile_type="gold")
    smdp.call("downloadOrder", profileType="gold")
    assert codes(smdp.call("downloadOrder", profileType="gold")) == ("8.2.5", "3.7")
    assert codes(smdp.call("downloadOrder", profileType="platinum")) == ("8.2.5", "3.9")


def test_download_order_without_iccid_or_profile_type_answers_2_1_2_2(smdp: Smdp) -> None:
    smdp.seed(1)
    assert codes(smdp.call("downloadOrder", eid=EID)) == ("2.1", "2.2")


def test_download_order_with_a_malformed_eid_fails(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    assert codes(smdp.call("downloadOrder", iccid=iccid, eid="1234")) == ("8.1.1", "2.1")
    assert smdp.profile(iccid)["state"] == "available"


def test_download_order_with_a_profile_type_that_does_not_match_the_iccid_fails(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1, profile_type="gold")
    assert codes(smdp.call("downloadOrder", iccid=iccid, profileType="default")) == ("8.2.5", "3.10")


# -- confirmOrder ----------------------------------------------------------------------------


def test_confirm_order_with_release_generates_a_matching_id_and_releases(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    smdp.call("downloadOrder", iccid=iccid, eid=EID)
    answer = smdp.call("confirmOrder", iccid=iccid, releaseFlag=True)
    assert status(answer) == "Executed-Success"
    assert answer["matchingId"].startswith("MID-")
    assert answer["smdpAddress"] == "smdp.sandbox.local"
    assert answer["eid"] == EID
    profile = smdp.profile(iccid)
    assert (profile["state"], profile["matching_id"]) == ("released", answer["matchingId"])


def test_confirm_order_keeps_the_given_matching_id_and_links_a_new_eid(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    smdp.call("downloadOrder", iccid=iccid)
    answer = smdp.call("confirmOrder", iccid=iccid, eid=EID, matchingId="ABCDE-12345", releaseFlag=False)
    assert answer["matchingId"] == "ABCDE-12345"
    profile = smdp.profile(iccid)
    assert (profile["state"], profile["eid"]) == ("confirmed", EID)


def test_a_repeated_confirm_order_answers_invalid_transition_even_with_the_same_matching_id(
    smdp: Smdp,
) -> None:
    [iccid] = smdp.seed(1)
    smdp.call("downloadOrder", iccid=iccid)
    smdp.call("confirmOrder", iccid=iccid, matchingId="RUN-1", releaseFlag=True)
    assert (
        codes(smdp.call("confirmOrder", iccid=iccid, matchingId="RUN-1", releaseFlag=True))
        == INVALID_TRANSITION
    )
    assert smdp.profile(iccid)["matching_id"] == "RUN-1"


def test_confirm_order_of_a_profile_never_ordered_answers_invalid_transition(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    assert codes(smdp.call("confirmOrder", iccid=iccid, releaseFlag=True)) == INVALID_TRANSITION


def test_confirm_order_with_another_eid_than_the_linked_one_answers_8_1_1_3_10(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    smdp.call("downloadOrder", iccid=iccid, eid=EID)
    assert codes(smdp.call("confirmOrder", iccid=iccid, eid=OTHER_EID, releaseFlag=True)) == ("8.1.1", "3.10")
    assert smdp.profile(iccid)["state"] == "linked"


def test_confirm_order_with_a_matching_id_of_another_profile_answers_8_2_6_3_3(smdp: Smdp) -> None:
    first, second = smdp.seed(2)
    for iccid in (first, second):
        smdp.call("downloadOrder", iccid=iccid)
    smdp.call("confirmOrder", iccid=first, matchingId="SAME", releaseFlag=True)
    assert (
        codes(smdp.call("confirmOrder", iccid=second, matchingId="SAME", releaseFlag=True))
        == MATCHING_ID_IN_USE
    )


def test_confirm_order_without_release_flag_fails(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    smdp.call("downloadOrder", iccid=iccid)
    assert codes(smdp.call("confirmOrder", iccid=iccid)) == ("1.1", "2.2")
    assert codes(smdp.call("confirmOrder", iccid=iccid, releaseFlag="yes")) == ("1.1", "2.1")


def test_a_profile_ordered_by_another_requester_cannot_be_confirmed(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    smdp.call("downloadOrder", iccid=iccid)
    assert (
        codes(smdp.call("confirmOrder", requester="operator-b", iccid=iccid, releaseFlag=True))
        == NOT_AUTHORIZED
    )


# -- releaseProfile and cancelOrder ------------------------------------------------------------


def test_release_profile_releases_a_confirmed_profile_once(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    smdp.call("downloadOrder", iccid=iccid)
    smdp.call("confirmOrder", iccid=iccid, releaseFlag=False)
    assert status(smdp.call("releaseProfile", iccid=iccid)) == "Executed-Success"
    assert smdp.profile(iccid)["state"] == "released"
    assert codes(smdp.call("releaseProfile", iccid=iccid)) == INVALID_TRANSITION


def test_cancel_order_makes_the_profile_available_again_and_clears_it(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    smdp.call("downloadOrder", iccid=iccid, eid=EID)
    smdp.call("confirmOrder", iccid=iccid, matchingId="M-1", releaseFlag=True)
    assert (
        status(smdp.call("cancelOrder", iccid=iccid, finalProfileStatusIndicator="Available"))
        == "Executed-Success"
    )
    profile = smdp.profile(iccid)
    assert (profile["state"], profile["eid"], profile["matching_id"], profile["owner"]) == (
        "available",
        None,
        None,
        None,
    )
    assert (
        codes(smdp.call("cancelOrder", iccid=iccid, finalProfileStatusIndicator="Available"))
        == INVALID_TRANSITION
    )
    assert smdp.call("downloadOrder", profileType="default")["iccid"] == iccid


def test_cancel_order_to_unavailable_takes_the_profile_out_of_the_pool(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    smdp.call("downloadOrder", iccid=iccid)
    smdp.call("cancelOrder", iccid=iccid, finalProfileStatusIndicator="Unavailable")
    assert smdp.profile(iccid)["state"] == "unavailable"
    assert codes(smdp.call("downloadOrder", profileType="default")) == ("8.2.5", "3.7")


def test_cancel_order_checks_the_eid_and_matching_id_it_is_given(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    smdp.call("downloadOrder", iccid=iccid, eid=EID)
    smdp.call("confirmOrder", iccid=iccid, matchingId="M-1", releaseFlag=True)
    cancel = {"iccid": iccid, "finalProfileStatusIndicator": "Available"}
    assert codes(smdp.call("cancelOrder", eid=OTHER_EID, **cancel)) == ("8.1.1", "3.10")
    assert codes(smdp.call("cancelOrder", matchingId="M-2", **cancel)) == ("8.2.6", "3.10")
    assert codes(smdp.call("cancelOrder", iccid=iccid, finalProfileStatusIndicator="Gone")) == ("1.1", "2.1")
    assert smdp.profile(iccid)["state"] == "released"


def test_cancel_order_after_the_device_downloaded_the_profile_answers_in_use(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    smdp.call("downloadOrder", iccid=iccid)
    smdp.call("confirmOrder", iccid=iccid, releaseFlag=True)
    assert smdp.admin("POST", f"profiles/{iccid}", {"state": "installed"}).json()["state"] == "installed"
    assert codes(smdp.call("cancelOrder", iccid=iccid, finalProfileStatusIndicator="Available")) == IN_USE


# -- admin -----------------------------------------------------------------------------------


def test_seeding_by_count_generates_distinct_valid_iccids(smdp: Smdp) -> None:
    iccids = smdp.seed(50)
    assert len(set(iccids)) == 50
    assert all(len(i) == 19 and i.startswith("89") and is_valid_iccid(i) for i in iccids)


def test_seeding_malformed_iccids_adds_none_and_names_each(smdp: Smdp) -> None:
    [good] = smdp.sim.generate_iccids(1)
    response = smdp.admin("POST", "profiles", {"iccids": [good, "8988299000000000001", "12"]})
    assert response.status_code == 400
    assert [bad["iccid"] for bad in response.json()["invalid"]] == ["8988299000000000001", "12"]
    assert smdp.admin("GET", "profiles/summary").json()["total"] == 0


def test_seeding_an_iccid_twice_skips_it(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    response = smdp.admin("POST", "profiles", {"iccids": [iccid]}).json()
    assert (response["added"], response["skipped"]) == (0, [iccid])


def test_profiles_are_listed_and_counted_by_state(smdp: Smdp) -> None:
    first, *_ = smdp.seed(3)
    smdp.call("downloadOrder", iccid=first)
    allocated = smdp.admin("GET", "profiles", state="allocated").json()["profiles"]
    assert [p["iccid"] for p in allocated] == [first]
    summary = smdp.admin("GET", "profiles/summary").json()
    assert (summary["available"], summary["allocated"], summary["released"], summary["total"]) == (2, 1, 0, 3)
    assert smdp.admin("GET", "profiles", state="lost").status_code == 400
    assert smdp.admin("GET", "profiles/8988299000000000006").status_code == 404


def test_the_request_log_shows_each_call_with_its_identifiers_and_outcome(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    smdp.call("downloadOrder", iccid=iccid)
    smdp.call("downloadOrder", iccid=iccid)
    log = smdp.admin("GET", "requests", function="downloadOrder").json()["requests"]
    assert [(r["status"], r["reason_code"], r["iccid"], r["requester"]) for r in log] == [
        ("Executed-Success", None, iccid, REQUESTER),
        ("Failed", "3.3", iccid, REQUESTER),
    ]
    assert log[0]["call_id"] != log[1]["call_id"]


def test_clearing_the_pool_deletes_every_profile(smdp: Smdp) -> None:
    smdp.seed(4)
    assert smdp.admin("DELETE", "profiles").json() == {"deleted": 4}
    assert smdp.admin("GET", "profiles").json() == {"profiles": []}


# -- faults ----------------------------------------------------------------------------------


def test_an_injected_error_at_http_200_answers_expired_and_changes_nothing(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    smdp.faults(error_status=200, force={"downloadOrder": ["error"]})
    answer = smdp.call("downloadOrder", iccid=iccid)
    assert status(answer) == "Expired"
    assert answer["header"]["functionExecutionStatus"]["statusCodeData"]["reasonCode"] == "5.1"
    assert smdp.profile(iccid)["state"] == "available"


def test_an_injected_503_answers_plain_text_and_changes_nothing(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    smdp.faults(error_status=503, force={"downloadOrder": ["error"]})
    header = {"functionRequesterIdentifier": REQUESTER, "functionCallIdentifier": "1"}
    response = smdp.raw("downloadOrder", {"header": header, "iccid": iccid})
    assert response.status_code == 503
    assert response.headers["Content-Type"].startswith("text/plain")
    assert smdp.profile(iccid)["state"] == "available"


def test_an_ambiguous_failure_applies_the_order_and_drops_the_answer(smdp: Smdp) -> None:
    [iccid] = smdp.seed(1)
    smdp.faults(force={"downloadOrder": ["ambiguous"]})
    with pytest.raises(requests.exceptions.ConnectionError):
        smdp.call("downloadOrder", iccid=iccid)
    assert smdp.profile(iccid)["state"] == "allocated"
    calls = smdp.admin("GET", "calls").json()
    assert calls["calls"]["downloadOrder"] == 1
    assert calls["injected"] == {"downloadOrder:ambiguous": 1}


def test_admin_routes_are_never_faulted(smdp: Smdp) -> None:
    smdp.faults(error_rate=1.0, error_status=503)
    assert len(smdp.seed(2)) == 2
    assert smdp.admin("GET", "profiles/summary").status_code == 200
