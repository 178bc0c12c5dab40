"""Seeded scenarios on the sandbox, and their effects counted from the simulators' own records.

Shared by the demo, the end-to-end tests, the chaos run and the benchmarks, so
they all exercise the same data: WHMCS clients (with or without a pay method)
and products, an SM-DP+ profile pool whose ICCIDs are loaded into our
inventory, and Salesforce Orders (eSIM or physical SIM) set to ``Activating``.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from provisioning.core.run_id import RunId
from provisioning.ledger import Ledger
from provisioning.ledger.inventory import EsimInventory
from provisioning.sandbox.runner import Sandbox

PRODUCTS = [
    {"pid": 1, "name": "Mobile plan 20 GB", "price": "19.00"},
    {"pid": 2, "name": "Roaming add-on", "price": "5.00"},
]
# Profiles seeded beyond the eSIM Orders, so that a repeat never runs the pool dry.
SPARE_PROFILES = 10
EID_PREFIX = "89049032"


@dataclass
class SeededOrder:
    order_id: str
    esim: bool
    whmcs_client_id: int
    has_pay_method: bool
    idem_key: str = "approval-1"

    @property
    def run_id(self) -> str:
        return str(RunId(self.order_id, self.idem_key))


def seed_orders(
    sandbox: Sandbox,
    inventory: EsimInventory,
    *,
    count: int,
    esim_share: float = 0.6,
    without_pay_method: int = 0,
    seed: int = 7,
) -> list[SeededOrder]:
    """``count`` Activating Orders; the last ``without_pay_method`` of them have a client with no pay method."""
    rng = random.Random(seed)
    whmcs = sandbox.admin("whmcs")
    existing = {p["pid"] for p in whmcs.get("/__admin/products")["products"]}
    missing = [p for p in PRODUCTS if p["pid"] not in existing]
    if missing:
        whmcs.post("/__admin/products", missing)

    plans = []
    for n in range(count):
        plans.append({"esim": rng.random() < esim_share, "pay": n < count - without_pay_method, "n": n})
    clients = [
        {
            "firstname": f"Customer{p['n']}",
            "lastname": "Example",
            "email": f"customer{p['n']}@example.test",
            "status": "Active",
            "paymethods": [{"type": "CreditCard", "card_last_four": "4242", "expiry_date": "12/30"}]
            if p["pay"]
            else [],
        }
        for p in plans
    ]
    client_ids = whmcs.post("/__admin/clients", clients)["ids"]

    n_esim = sum(1 for p in plans if p["esim"])
    if n_esim:
        seeded = sandbox.admin("smdp").post(
            "/__admin/profiles", {"count": n_esim + SPARE_PROFILES, "profile_type": "default"}
        )
        inventory.load(seeded["iccids"])

    orders = []
    for plan, client_id in zip(plans, client_ids, strict=True):
        order: dict[str, Any] = {
            "activation_status": "Activating",
            "sim_type": "eSIM" if plan["esim"] else "Physical",
            "whmcs_client_id": str(client_id),
            "email": f"customer{plan['n']}@example.test",
            "first_name": f"Customer{plan['n']}",
            "items": [{"quantity": 1, "whmcs_product_id": "1"}]
            + ([{"quantity": 1, "whmcs_product_id": "2"}] if plan["n"] % 3 == 0 else []),
        }
        if plan["esim"]:
            order["eid"] = EID_PREFIX + "".join(rng.choice("0123456789") for _ in range(24))
        orders.append(order)
    ids = sandbox.admin("salesforce").post("/__admin/orders", orders)["ids"]
    return [
        SeededOrder(order_id=i, esim=bool(p["esim"]), whmcs_client_id=c, has_pay_method=bool(p["pay"]))
        for i, p, c in zip(ids, plans, client_ids, strict=True)
    ]


# How often wait_until looks again.
WAIT_POLL_S = 0.25


def wait_until(
    predicate: Callable[[], object], timeout_s: float = 120.0, poll_s: float = WAIT_POLL_S
) -> object:
    """Poll ``predicate`` until it is truthy; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s}s")
        time.sleep(poll_s)


def settled(sandbox: Sandbox, ledger: Ledger, order_ids: list[str]) -> Callable[[], bool]:
    """A predicate: every Order is Activated or Failed, and no run of any of them is still in flight."""

    def check() -> bool:
        views = {o["Id"]: o for o in sandbox.admin("salesforce").get("/__admin/orders")["orders"]}
        if any(views[oid]["Activation_Status__c"] not in ("Activated", "Failed") for oid in order_ids):
            return False
        return not any(ledger.orders.in_flight(oid) for oid in order_ids)

    return check


def publish_events_admin(sandbox: Sandbox, payloads: list[dict[str, Any]]) -> list[int]:
    """Put events on the bus in one call (fast; the demo publishes over the REST API instead)."""
    answer = sandbox.admin("salesforce").post("/__admin/events", payloads)
    return [e["replayId"] for e in answer["events"]]


def event_payload(order: SeededOrder) -> dict[str, Any]:
    return {"OrderId__c": order.order_id, "IdemKey__c": order.idem_key}


@dataclass
class Effects:
    """What the simulators saw, counted from their own records."""

    orders_by_status: dict[str, int]
    activated: int
    failed: int
    whmcs_orders: int
    whmcs_accepted: int
    whmcs_orders_per_order: dict[str, int]
    esim_confirmed: int
    esim_reserved_unconfirmed: int
    emails: int
    distinct_message_ids: int
    sf_api_calls: dict[str, int]

    @property
    def duplicate_whmcs_orders(self) -> int:
        return sum(n - 1 for n in self.whmcs_orders_per_order.values() if n > 1)


def _note_order_id(notes: str, note_prefix: str) -> str | None:
    """The Order id in a WHMCS order's notes (the effect key, without a reprovision's ``#n``)."""
    if note_prefix not in notes:
        return None
    return notes.split(note_prefix, 1)[1].strip().split("#", 1)[0]


def count_effects(sandbox: Sandbox, *, note_prefix: str = "provisioning order ") -> Effects:
    sf_orders = sandbox.admin("salesforce").get("/__admin/orders")["orders"]
    statuses = Counter(str(o.get("Activation_Status__c")) for o in sf_orders)
    whmcs_orders = sandbox.admin("whmcs").get("/__admin/orders")["orders"]
    per_order: Counter[str] = Counter()
    for o in whmcs_orders:
        order_id = _note_order_id(o.get("notes") or "", note_prefix)
        if order_id:
            per_order[order_id] += 1
    profiles = sandbox.admin("smdp").get("/__admin/profiles/summary")
    confirmed = sum(profiles.get(state, 0) for state in ("confirmed", "released", "downloaded", "installed"))
    reserved = sum(profiles.get(state, 0) for state in ("allocated", "linked"))
    mail = sandbox.admin("smtp").get("/__admin/messages/summary")
    calls = sandbox.admin("salesforce").get("/__admin/calls")["calls"]
    return Effects(
        orders_by_status=dict(statuses),
        activated=statuses.get("Activated", 0),
        failed=statuses.get("Failed", 0),
        whmcs_orders=len(whmcs_orders),
        whmcs_accepted=sum(1 for o in whmcs_orders if o.get("status") == "Active"),
        whmcs_orders_per_order=dict(per_order),
        esim_confirmed=confirmed,
        esim_reserved_unconfirmed=reserved,
        emails=int(mail["count"]),
        distinct_message_ids=int(mail["distinct_message_ids"]),
        sf_api_calls=dict(calls),
    )


@dataclass
class OrderEffects:
    """Everything one Order caused in the simulators, from their own records."""

    order_id: str
    status: str | None
    whmcs_orders: list[str]  # ids of the WHMCS orders made for it
    whmcs_accepted: int
    esim_profiles: int  # profiles reserved or confirmed for the Order's EID
    patches: list[dict[str, Any]]  # our REST writes of the Order, in order
    emails: int
    message_ids: set[str]

    @property
    def written_whmcs_ids(self) -> set[str]:
        return {str(p["WHMCS_Order_ID__c"]) for p in self.patches if p.get("WHMCS_Order_ID__c")}

    @property
    def written_iccids(self) -> set[str]:
        return {str(p["ESIM_ICCID__c"]) for p in self.patches if p.get("ESIM_ICCID__c")}

    def problems(self) -> list[str]:
        """Why this Order was not provisioned exactly once (empty when it was)."""
        found = []
        if len(self.whmcs_orders) != 1 or self.whmcs_accepted != 1:
            found.append(f"{len(self.whmcs_orders)} WHMCS orders ({self.whmcs_accepted} accepted)")
        if self.esim_profiles > 1:
            found.append(f"{self.esim_profiles} eSIM profiles")
        if self.status != "Activated":
            found.append(f"status {self.status}")
        if self.written_whmcs_ids != set(self.whmcs_orders):
            found.append(f"PATCHes wrote WHMCS orders {sorted(self.written_whmcs_ids)}")
        if len(self.written_iccids) > 1:
            found.append(f"PATCHes wrote ICCIDs {sorted(self.written_iccids)}")
        statuses = [p["Activation_Status__c"] for p in self.patches if "Activation_Status__c" in p]
        if not statuses or statuses[-1] != "Activated":
            found.append(f"the PATCHes of the status were {statuses}")
        if self.emails < 1 or len(self.message_ids) != 1:
            found.append(f"{self.emails} e-mails with {len(self.message_ids)} Message-IDs")
        return found


def effects_by_order(
    sandbox: Sandbox, *, note_prefix: str = "provisioning order "
) -> dict[str, OrderEffects]:
    """Per Order of the org: its WHMCS orders, eSIM profiles, REST writes and e-mails."""
    sf_orders = sandbox.admin("salesforce").get("/__admin/orders")["orders"]
    whmcs_orders = sandbox.admin("whmcs").get("/__admin/orders")["orders"]
    profiles = sandbox.admin("smdp").get("/__admin/profiles")["profiles"]
    messages = sandbox.admin("smtp").get("/__admin/messages")["messages"]
    result = {}
    for order in sf_orders:
        order_id = str(order["Id"])
        mine = [o for o in whmcs_orders if _note_order_id(o.get("notes") or "", note_prefix) == order_id]
        eid = order.get("EID__c")
        taken = ("allocated", "linked", "confirmed", "released", "downloaded", "installed")
        mails = [m for m in messages if str(m.get("message_id") or "").startswith(f"<{order_id}.")]
        result[order_id] = OrderEffects(
            order_id=order_id,
            status=order.get("Activation_Status__c"),
            whmcs_orders=[str(o["id"]) for o in mine],
            whmcs_accepted=sum(1 for o in mine if o.get("status") == "Active"),
            esim_profiles=sum(1 for p in profiles if eid and p.get("eid") == eid and p.get("state") in taken),
            patches=[p["fields"] for p in order.get("patches", []) if p.get("source") == "api"],
            emails=len(mails),
            message_ids={str(m["message_id"]) for m in mails},
        )
    return result
