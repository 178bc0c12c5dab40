"""What every simulator shares: TLS, fault injection, call counting, admin routes, the server thread.

A simulator is an aiohttp application (SMTP is the exception, see ``smtp.py``).
Its API handlers wrap each operation in :meth:`FaultInjector.run`, which applies
the configured latency, errors, connection resets and ambiguous failures (the
action is applied, then the response is lost) and counts the call. Every
simulator also serves ``/__admin/...`` JSON routes, never subject to faults:

- ``GET  /__admin/faults``  the fault settings; ``POST`` replaces them (a JSON
  :class:`Faults`), plus ``{"force": {"<operation>": ["reset", "ambiguous", "error", ...]}}``
  queues one-shot faults for the next calls of that operation.
- ``GET  /__admin/calls``   API calls per operation; ``POST /__admin/calls/reset`` zeroes them.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import random
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import trustme
from aiohttp import web

FaultKind = Literal["error", "reset", "ambiguous"]
FAULT_KINDS: tuple[str, ...] = ("error", "reset", "ambiguous")
ADMIN_PREFIX = "/__admin"
# Seconds of per-second call counts kept (an hour).
PER_SECOND_KEPT = 3600

# How long a stopping server waits for open requests (long polls included) to end.
SHUTDOWN_GRACE_S = 1.0
# How long start() waits for every site to listen.
STARTUP_TIMEOUT_S = 10.0


@dataclass
class Faults:
    """Fault settings of one simulator. Rates are probabilities per API call (0..1)."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    # HTTP status of an injected error; 200 means the API's own error envelope at HTTP 200.
    error_status: int = 503
    reset_rate: float = 0.0
    ambiguous_rate: float = 0.0
    # Only these operations get random faults (latency included); empty: all of them.
    operations: list[str] = field(default_factory=list)
    # An injected error's Retry-After header, in seconds (0: none).
    retry_after_s: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Faults:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"force"}
        if unknown:
            raise ValueError(f"unknown fault settings {sorted(unknown)}; known: {sorted(known)}")
        faults = cls(**{k: v for k, v in data.items() if k in known})
        for name in ("error_rate", "reset_rate", "ambiguous_rate"):
            if not 0.0 <= getattr(faults, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if faults.error_status not in (200, 429, 500, 502, 503, 504):
            raise ValueError("error_status must be one of 200, 429, 500, 502, 503, 504")
        return faults


class ResponseLost(Exception):
    """Raised inside a handler after the connection was aborted on purpose."""


ErrorResponder = Callable[[int], web.StreamResponse]


class FaultInjector:
    """Applies one simulator's faults to its operations and counts its API calls."""

    def __init__(self, faults: Faults | None = None, *, seed: int | None = None) -> None:
        self.faults = faults or Faults()
        self.forced: dict[str, collections.deque[str]] = collections.defaultdict(collections.deque)
        self.calls: collections.Counter[str] = collections.Counter()
        # Calls by the second they arrived in (epoch seconds): what a rate limit must keep under.
        self.per_second: collections.Counter[int] = collections.Counter()
        self.injected: collections.Counter[str] = collections.Counter()
        self._rng = random.Random(seed)

    def configure(self, data: dict[str, Any]) -> None:
        force = data.get("force") or {}
        faults = Faults.from_json(data)
        for kinds in force.values():
            for kind in kinds:
                if kind not in FAULT_KINDS:
                    raise ValueError(f"unknown forced fault {kind!r}; known: {FAULT_KINDS}")
        self.faults = faults
        for operation, kinds in force.items():
            self.forced[operation].extend(kinds)

    def force(self, operation: str, *kinds: FaultKind) -> None:
        self.forced[operation].extend(kinds)

    def _count(self, operation: str) -> None:
        self.calls[operation] += 1
        second = int(time.time())
        self.per_second[second] += 1
        if len(self.per_second) > PER_SECOND_KEPT:
            for old in sorted(self.per_second)[: len(self.per_second) - PER_SECOND_KEPT]:
                del self.per_second[old]

    def _applies(self, operation: str) -> bool:
        ops = self.faults.operations
        return not ops or operation in ops

    def _roll(self, operation: str) -> str | None:
        queue = self.forced.get(operation)
        if queue:
            return queue.popleft()
        if not self._applies(operation):
            return None
        f = self.faults
        r = self._rng.random()
        for kind, rate in (("error", f.error_rate), ("reset", f.reset_rate), ("ambiguous", f.ambiguous_rate)):
            if r < rate:
                return kind
            r -= rate
        return None

    def next_fault(self, operation: str) -> str | None:
        """Count a call of ``operation`` and draw its fault; for simulators that are not HTTP (SMTP)."""
        self._count(operation)
        kind = self._roll(operation)
        if kind:
            self.injected[f"{operation}:{kind}"] += 1
        return kind

    async def delay(self, operation: str) -> None:
        f = self.faults
        if (f.latency_ms or f.jitter_ms) and self._applies(operation):
            await asyncio.sleep((f.latency_ms + self._rng.uniform(0, f.jitter_ms)) / 1000.0)

    async def run(
        self,
        request: web.Request,
        operation: str,
        action: Callable[[], Awaitable[web.StreamResponse]],
        error_response: ErrorResponder,
    ) -> web.StreamResponse:
        """Count the call, then run ``action`` under this simulator's faults."""
        self._count(operation)
        await self.delay(operation)
        kind = self._roll(operation)
        if kind:
            self.injected[f"{operation}:{kind}"] += 1
        if kind == "error":
            status = self.faults.error_status
            response = error_response(status)
            if self.faults.retry_after_s:
                response.headers["Retry-After"] = str(self.faults.retry_after_s)
            return response
        if kind == "reset":
            abort(request)
        response = await action()
        if kind == "ambiguous":
            abort(request)
        return response

    def admin_routes(self) -> list[web.RouteDef]:
        async def get_faults(_: web.Request) -> web.Response:
            return web.json_response(
                {**asdict(self.faults), "force": {k: list(v) for k, v in self.forced.items() if v}}
            )

        async def set_faults(request: web.Request) -> web.Response:
            try:
                self.configure(await request.json())
            except (ValueError, TypeError) as exc:
                return web.json_response({"error": str(exc)}, status=400)
            return await get_faults(request)

        async def get_calls(_: web.Request) -> web.Response:
            return web.json_response(
                {
                    "calls": dict(self.calls),
                    "total": sum(self.calls.values()),
                    "per_second": {str(k): v for k, v in sorted(self.per_second.items())},
                    "injected": dict(self.injected),
                }
            )

        async def reset_calls(_: web.Request) -> web.Response:
            self.calls.clear()
            self.per_second.clear()
            self.injected.clear()
            return web.json_response({"calls": {}, "total": 0, "injected": {}})

        return [
            web.get(f"{ADMIN_PREFIX}/faults", get_faults),
            web.post(f"{ADMIN_PREFIX}/faults", set_faults),
            web.get(f"{ADMIN_PREFIX}/calls", get_calls),
            web.post(f"{ADMIN_PREFIX}/calls/reset", reset_calls),
        ]


def abort(request: web.Request) -> None:
    """Drop the connection without an answer (the client sees a reset), then stop the handler."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    raise ResponseLost()


@web.middleware
async def response_lost_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ResponseLost:
        # The transport is gone; this response is never written.
        return web.Response(status=499)


def new_app(*routes: Iterable[web.RouteDef], client_max_size: int = 1024**2) -> web.Application:
    """An aiohttp application with the fault plumbing installed and ``routes`` added."""
    app = web.Application(middlewares=[response_lost_middleware], client_max_size=client_max_size)
    for group in routes:
        app.add_routes(list(group))
    return app


# -- TLS --------------------------------------------------------------------------------------


@dataclass
class SandboxTLS:
    """A locally generated CA and one server certificate for localhost and 127.0.0.1 (and extra hosts)."""

    ca_bundle: Path
    server_context: ssl.SSLContext
    # The same certificate chain and key as PEM, for servers that do not take an SSLContext (gRPC).
    server_cert_chain_pem: bytes = field(default=b"", repr=False)
    server_key_pem: bytes = field(default=b"", repr=False)
    # Files for servers of ours the simulators call (the ES2+ notification endpoint): the same server
    # certificate, and a client certificate of the same CA the SM-DP+ simulator presents (mutual TLS).
    server_cert_file: Path | None = None
    server_key_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    @classmethod
    def create(cls, workdir: Path, *, extra_hosts: tuple[str, ...] = ()) -> SandboxTLS:
        """``extra_hosts``: further names or addresses the certificate is valid for (a bind address)."""
        workdir.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA(organization_name="provisioning sandbox")
        cert = ca.issue_cert("localhost", "127.0.0.1", "::1", *extra_hosts)
        ca_bundle = workdir / "sandbox-ca.pem"
        ca.cert_pem.write_to_path(str(ca_bundle))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        chain = b"".join(pem.bytes() for pem in cert.cert_chain_pems)
        client = ca.issue_cert("smdp.sandbox.local")
        files = {
            "server-cert.pem": chain,
            "server-key.pem": cert.private_key_pem.bytes(),
            "smdp-client-cert.pem": b"".join(pem.bytes() for pem in client.cert_chain_pems),
            "smdp-client-key.pem": client.private_key_pem.bytes(),
        }
        for name, data in files.items():
            (workdir / name).write_bytes(data)
            (workdir / name).chmod(0o600)
        return cls(
            ca_bundle=ca_bundle,
            server_context=ctx,
            server_cert_chain_pem=chain,
            server_key_pem=cert.private_key_pem.bytes(),
            server_cert_file=workdir / "server-cert.pem",
            server_key_file=workdir / "server-key.pem",
            client_cert_file=workdir / "smdp-client-cert.pem",
            client_key_file=workdir / "smdp-client-key.pem",
        )


# -- running servers --------------------------------------------------------------------------

StartHook = Callable[[asyncio.AbstractEventLoop], Awaitable[tuple[Any, int]]]


class ServerThread:
    """Runs aiohttp applications (and extra asyncio servers) on one event loop in a thread.

    ``add_app(name, app, port)`` before ``start()``; port 0 picks a free one.
    ``add_server(name, starter)`` takes a coroutine function that starts an
    asyncio server on the loop and returns ``(server, port)``; the server's
    ``close()`` is called at stop, and awaited when it returns an awaitable.
    """

    def __init__(self, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.ssl_context = ssl_context
        self.ports: dict[str, int] = {}
        self._apps: dict[str, tuple[web.Application, int]] = {}
        self._starters: dict[str, StartHook] = {}
        self._runners: list[web.AppRunner] = []
        self._servers: list[Any] = []
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def add_app(self, name: str, app: web.Application, port: int = 0) -> None:
        self._apps[name] = (app, port)

    def add_server(self, name: str, starter: StartHook) -> None:
        self._starters[name] = starter

    def url(self, name: str) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.ports[name]}"

    async def _start_all(self) -> None:
        for name, (app, port) in self._apps.items():
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
            await runner.setup()
            site = web.TCPSite(runner, self.host, port, ssl_context=self.ssl_context, reuse_address=True)
            await site.start()
            self._runners.append(runner)
            server = site._server
            sockets = getattr(server, "sockets", None)
            assert sockets, f"{name} is not listening"
            self.ports[name] = sockets[0].getsockname()[1]
        for name, starter in self._starters.items():
            server, port = await starter(self._loop)
            self._servers.append(server)
            self.ports[name] = port

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start_all())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        # Stop order: servers stop listening, open requests get their grace, then the loop closes.
        for server in self._servers:
            closing = server.close()
            if inspect.isawaitable(closing):  # gRPC's server stops with a grace period
                self._loop.run_until_complete(closing)
        for runner in self._runners:
            self._loop.run_until_complete(runner.cleanup())
        # What is left is sessions of clients still connected (an SMTP client keeps its connection
        # between messages): cancelled and awaited, as asyncio.run does, so that none is left pending.
        leftover = asyncio.all_tasks(self._loop)
        for task in leftover:
            task.cancel()
        if leftover:
            self._loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="sandbox-servers", daemon=True)
        self._thread.start()
        if not self._ready.wait(STARTUP_TIMEOUT_S):
            raise RuntimeError("sandbox servers did not start in time")
        if self._error is not None:
            raise RuntimeError(f"sandbox servers failed to start: {self._error}") from self._error

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server loop and return its result (thread-safe state access)."""

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(STARTUP_TIMEOUT_S)

    def stop(self) -> None:
        if self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STARTUP_TIMEOUT_S + SHUTDOWN_GRACE_S * 2)
        self._thread = None
