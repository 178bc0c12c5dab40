"""The ledger's Redis scripts: each a ``.lua`` file beside this module, its KEYS and ARGV at its top.

They are registered on a client once (redis-py's ``Script``: EVALSHA, loading the
script again after a ``NOSCRIPT``); a :class:`Batch` sends scripts queued in a
pipeline the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

LUA_DIR = Path(__file__).with_name("lua")


@cache
def source(name: str) -> str:
    """The text of ``lua/<name>.lua``."""
    return (LUA_DIR / f"{name}.lua").read_text()


class Scripts:
    """The scripts registered on one client, by name."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._registered: dict[str, Script] = {}

    def __getitem__(self, name: str) -> Script:
        script = self._registered.get(name)
        if script is None:
            script = self._client.register_script(source(name))
            self._registered[name] = script
        return script


class Batch:
    """A pipeline (one round trip, no MULTI) that may carry scripts as bare EVALSHA.

    redis-py checks the script cache (SCRIPT EXISTS, one more round trip) before every
    pipeline that holds a ``Script``; the cache is nearly always warm, so here that round
    trip is paid only when the server answers NOSCRIPT (after a restart or a failover): the
    script is then loaded and run again on its own (the commands queued after it did run).
    Any other error is raised, the first one, as ``pipe.execute()`` would.
    """

    def __init__(self, client: redis.Redis, scripts: Scripts) -> None:
        self.pipe = client.pipeline(transaction=False)
        self._scripts = scripts
        self._queued: dict[int, tuple[str, list[str], list[Any]]] = {}

    def script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> None:
        self._queued[len(self.pipe.command_stack)] = (name, list(keys), list(args))
        self.pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *args)

    def execute(self) -> list[Any]:
        replies: list[Any] = self.pipe.execute(raise_on_error=False)
        for index, (name, keys, args) in self._queued.items():
            if isinstance(replies[index], NoScriptError):
                replies[index] = self._scripts[name](keys=keys, args=args)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies
