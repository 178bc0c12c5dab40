"""The run id, parsed once: ``{OrderId (18 characters)}:{IdemKey__c or 'default'}``.

A run is one attempt at provisioning one Order. Tasks carry the text form (Flower
shows it); everything else works on :class:`RunId`.
"""

from __future__ import annotations

from typing import NamedTuple

ORDER_ID_CHARS = 18
DEFAULT_IDEM_KEY = "default"


class RunId(NamedTuple):
    order_id: str
    idem_key: str

    @classmethod
    def parse(cls, text: str) -> RunId:
        """``ValueError`` naming the expected form when ``text`` is not a run id."""
        order_id, sep, idem_key = str(text).partition(":")
        if not sep or len(order_id) != ORDER_ID_CHARS or not idem_key:
            raise ValueError(f"not a run id (expected '<18-character OrderId>:<IdemKey>'): {text!r}")
        return cls(order_id, idem_key)

    @classmethod
    def for_event(cls, order_id: str, idem_key: str | None) -> RunId:
        """The run an event asks for; without an ``IdemKey__c`` it is the Order's ``default`` run."""
        return cls(order_id, (idem_key or "").strip() or DEFAULT_IDEM_KEY)

    def __str__(self) -> str:
        return f"{self.order_id}:{self.idem_key}"
