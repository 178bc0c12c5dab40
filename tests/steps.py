"""Steps for the in-process tests: a row of the step table acting as the test says."""

from __future__ import annotations

import dataclasses
from typing import Any

from provisioning.runs.chain import CHAIN
from provisioning.step.context import StepContext
from provisioning.step.results import StepResult
from provisioning.step.spec import StepSpec


def at(name: str, action: Any) -> StepSpec:
    """The step table's row ``name``, acting with ``action``."""
    return dataclasses.replace(CHAIN[name], action=action)


def ok(result: StepResult) -> Any:
    """An action that does nothing but say ``result``."""

    def action(ctx: StepContext) -> StepResult:
        return result

    return action


def raising(exc: Exception) -> Any:
    """An action that fails with ``exc``, every time."""

    def action(ctx: StepContext) -> StepResult:
        raise exc

    return action
