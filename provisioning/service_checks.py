"""Probes of the external services for ``provisioning check`` (filled in as clients land)."""

from __future__ import annotations

from collections.abc import Callable

from provisioning.settings import Settings


def external_probes(settings: Settings) -> list[tuple[str, Callable[[Settings], str] | None]]:
    return []
