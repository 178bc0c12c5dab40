"""The Order as provisioning sees it: the fields the steps need, read with the worker's one query.

Shared by the domains (the WHMCS step reads the client and products, the e-mail
the address), the step context and the lifecycle; it imports nothing of theirs.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class OrderItem(BaseModel):
    """One line of an Order."""

    model_config = ConfigDict(frozen=True)

    quantity: int
    whmcs_product_id: str | None


class Order(BaseModel):
    """The Order fields provisioning needs (names and e-mail kept out of reprs and logs)."""

    model_config = ConfigDict(frozen=True)

    id: str
    order_number: str | None
    activation_status: str | None
    whmcs_client_id: str | None
    email: str | None = Field(repr=False)
    first_name: str | None = Field(repr=False)
    sim_type: str | None
    eid: str | None
    items: tuple[OrderItem, ...]
    # What an earlier provisioning wrote back: the Order's own record of its effects.
    whmcs_order_id: str | None = None
    esim_iccid: str | None = None
    activated_at: str | None = None
