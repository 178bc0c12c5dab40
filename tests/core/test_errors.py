"""Every exception class of ``provisioning`` and ``tasks`` survives pickle with its message and attributes.

Celery pickles exceptions (result backends, events, the prefork pool). The walk
below imports every module of both packages and finds every exception class
defined there; each is built from a sample (one per constructor signature, in
:data:`SAMPLES`) and round-tripped. A new class with a constructor of its own
fails here until it has a sample.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from pydantic import SecretStr

import provisioning
import tasks
from provisioning.core.errors import OrderRejected, PermanentError, ProvisioningError, TransientError
from provisioning.core.retry import Cause, Wait
from provisioning.core.settings import ConfigError
from provisioning.email.errors import EmailError
from provisioning.esim.errors import (
    BatchProblem,
    Es2PlusFunctionFailed,
    Es2PlusProtocolError,
    Es2PlusServerError,
    FunctionStatus,
    InventoryFileError,
    _WithFunctionStatus,
)
from provisioning.ledger.inventory import InventoryEmpty
from provisioning.ops.console.web import Refused
from provisioning.runs.lifecycle import RunEnded, RunFailed
from provisioning.salesforce.auth import AccessToken
from provisioning.salesforce.client import _SessionExpired
from provisioning.salesforce.errors import SalesforceError
from provisioning.salesforce.keys import KeyFilesExist
from provisioning.sandbox import smdp as smdp_simulator
from provisioning.sandbox import whmcs as whmcs_simulator
from provisioning.sandbox.salesforce import auth as sf_auth
from provisioning.sandbox.salesforce import model as sf_model
from provisioning.sandbox.salesforce import pubsub as sf_pubsub
from provisioning.whmcs.errors import WhmcsError

pytestmark = pytest.mark.fast

Build = Callable[[type[BaseException]], BaseException]

STATUS = FunctionStatus(
    function="downloadOrder",
    status="Failed",
    subject_code="8.2.1",
    reason_code="3.9",
    subject_identifier="8988299000000000006",
    message="unknown ICCID",
)

# One sample per constructor: keyed by the class whose __init__ a class uses.
SAMPLES: dict[type[BaseException], Build] = {
    BaseException: lambda cls: cls("something went wrong"),
    SystemExit: lambda cls: cls("--pool gevent is not supported: use --pool threads"),
    SalesforceError: lambda cls: cls(
        "Salesforce query Order: HTTP 503", status=503, error_code="SERVER_UNAVAILABLE"
    ),
    WhmcsError: lambda cls: cls("WHMCS AddOrder: x", action="AddOrder", status=200, api_message="x"),
    EmailError: lambda cls: cls("SMTP DATA answered 451 4.3.0", code=451),
    Es2PlusServerError: lambda cls: cls("downloadOrder: HTTP 503", status_code=503),
    Es2PlusProtocolError: lambda cls: cls("downloadOrder: HTTP 404", status_code=404),
    _WithFunctionStatus: lambda cls: cls(STATUS),
    InventoryEmpty: lambda cls: cls(),
    InventoryFileError: lambda cls: cls([BatchProblem(3, "89x", "not digits")], source="batch.txt"),
    ConfigError: lambda cls: cls([("REDIS_URL", "expected a URL starting with redis://")]),
    _SessionExpired: lambda cls: cls(
        AccessToken(access_token=SecretStr("t0k3n"), instance_url="https://x.test", issued_at=1.0),
        "INVALID_SESSION_ID",
        "Session expired or invalid",
    ),
    smdp_simulator.FunctionFailed: lambda cls: cls("8.2.1", "3.9", "unknown ICCID", "8988299000000000006"),
    whmcs_simulator.ApiError: lambda cls: cls("Invoice ID Not Found", key="status"),
    Wait: lambda cls: cls(Cause.LEASE_BUSY, 2.0, "another worker holds the Order's lease"),
    RunEnded: lambda cls: cls({"joined": "801Dn0000HeJ6rrIQC:approval-1"}),
    RunFailed: lambda cls: cls("validate_payment: no valid payment method", writeback_in_s=1.5),
    sf_model.ApiError: lambda cls: cls(400, "MALFORMED_ID", "bad id", ["Id"]),
    sf_auth.OAuthError: lambda cls: cls("invalid_grant", "audience is invalid"),
    sf_pubsub._Abort: lambda cls: cls(
        grpc.StatusCode.UNAVAILABLE, "sfdc.platform.eventbus.grpc.service.unavailable", "down"
    ),
    Refused: lambda cls: cls("'nope' is not a run id", 404),
    KeyFilesExist: lambda cls: cls([Path("salesforce-jwt.key")]),
}


def _modules(package: ModuleType) -> Iterator[ModuleType]:
    yield package
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        yield importlib.import_module(info.name)


def exception_classes() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for package in (provisioning, tasks):
        for module in _modules(package):
            for obj in vars(module).values():
                if (
                    inspect.isclass(obj)
                    and issubclass(obj, BaseException)
                    and obj.__module__ == module.__name__
                ):
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[name] for name in sorted(found)]


def _name(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _constructor_owner(cls: type[BaseException]) -> type[BaseException]:
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and issubclass(klass, BaseException):
            return klass if klass not in (Exception, ValueError) else BaseException
    return BaseException


def build(cls: type[BaseException]) -> BaseException:
    owner = _constructor_owner(cls)
    if owner not in SAMPLES:
        pytest.fail(
            f"{_name(cls)} has a constructor of its own ({_name(owner)}.__init__); "
            "add a sample to SAMPLES in tests/core/test_errors.py"
        )
    return SAMPLES[owner](cls)


def round_trip(exc: BaseException) -> BaseException:
    copy: BaseException = pickle.loads(pickle.dumps(exc))  # noqa: S301 (our own object)
    return copy


CLASSES = exception_classes()


def test_the_walk_finds_the_exception_classes_of_every_layer() -> None:
    names = {_name(cls) for cls in CLASSES}
    assert {
        "provisioning.core.errors.ProvisioningError",
        "provisioning.esim.errors.Es2PlusFunctionFailed",
        "provisioning.core.settings.ConfigError",
        "provisioning.salesforce.streaming._Stopped",
        "provisioning.sandbox.smdp.FunctionFailed",
        "provisioning.runs.lifecycle.RunFailed",
    } <= names
    assert len(CLASSES) > 50


@pytest.mark.parametrize("cls", CLASSES, ids=_name)
def test_every_exception_class_survives_pickle_with_its_message_and_attributes(
    cls: type[BaseException],
) -> None:
    original = build(cls)
    copy = round_trip(original)
    assert type(copy) is cls
    assert copy.args == original.args
    assert str(copy) == str(original)
    assert vars(copy) == vars(original)


def test_a_new_class_with_its_own_constructor_and_no_sample_fails_the_walk() -> None:
    class Unknown(ProvisioningError):
        def __init__(self, a: int, *, b: int) -> None:
            super().__init__(f"{a} {b}")

    with pytest.raises(pytest.fail.Exception, match="add a sample to SAMPLES"):
        build(Unknown)


def test_what_the_steps_read_from_an_error_survives_too() -> None:
    failed = round_trip(Es2PlusFunctionFailed(STATUS))
    assert isinstance(failed, Es2PlusFunctionFailed)
    assert failed.has_code("8.2.1", "3.9")
    assert isinstance(failed, PermanentError)
    assert isinstance(round_trip(InventoryEmpty()), TransientError)
    assert str(round_trip(OrderRejected("no valid payment method"))) == "no valid payment method"
