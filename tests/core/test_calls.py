"""The seam through which clients announce each request, and a step's caller counts it."""

from __future__ import annotations

import threading

import pytest

from provisioning.core import calls

pytestmark = pytest.mark.fast


def test_a_request_nobody_counts_goes_out_without_anything_happening() -> None:
    calls.going_out("whmcs")  # no error, no counter


def test_only_the_system_counted_in_this_block_is_counted_and_blocks_nest() -> None:
    seen: list[str] = []
    with calls.counting("smdp", lambda: seen.append("smdp")):
        calls.going_out("smdp")
        calls.going_out("whmcs")
        with calls.counting("salesforce", lambda: seen.append("salesforce")):
            calls.going_out("salesforce")
            calls.going_out("smdp")
        calls.going_out("salesforce")  # its block has ended
    calls.going_out("smdp")  # so has this one
    assert seen == ["smdp", "salesforce", "smdp"]


def test_another_thread_s_requests_are_not_counted_by_this_thread_s_step() -> None:
    seen: list[str] = []
    with calls.counting("smtp", lambda: seen.append(threading.current_thread().name)):
        other = threading.Thread(target=calls.going_out, args=("smtp",), name="other")
        other.start()
        other.join()
        calls.going_out("smtp")
    assert seen == [threading.current_thread().name]
