"""A client's request to its external system, announced as it goes out: what a rate limit counts.

A step is admitted by its system's rate limit before it runs, for the calls its
row declares; but those calls go out one after the other, the second a latency
after the first, perhaps in the next second. So that the limit holds for the
calls as the system sees them, each client announces every request here just
before it sends it (:func:`going_out`), and whoever admitted the step
(``provisioning.runs.protection``) counts it then (:func:`counting`). Nobody
counting (the CLI, the checks, a client on its own): nothing happens.

A seam: the clients import only this module; what counting means is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType

_COUNTERS: ContextVar[Mapping[str, Callable[[], None]]] = ContextVar(
    "provisioning_call_counters", default=MappingProxyType({})
)


def going_out(system: str) -> None:
    """A request to ``system`` is about to be sent (by this thread, for the step it runs)."""
    counter = _COUNTERS.get().get(system)
    if counter is not None:
        counter()


@contextmanager
def counting(system: str, counter: Callable[[], None]) -> Iterator[None]:
    """Within the block, ``counter()`` is called for each request to ``system`` going out."""
    token = _COUNTERS.set(MappingProxyType({**_COUNTERS.get(), system: counter}))
    try:
        yield
    finally:
        _COUNTERS.reset(token)
