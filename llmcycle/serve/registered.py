"""Registry names served live: each follows its alias or A/B split, and a move switches traffic without a
restart and without failing a request in flight.

A served name (`chat`, `chat@staging`, `chat@3`) answers from the version(s) `Registry.state` gives it. Every
version in use has its own engine, in the server's engines under `NAME@N` (so `/metrics`, the drain and the
request log treat it like any served model, and a client may pin `chat@3` while it is loaded). `follow()`
polls the registry: a version that becomes wanted is loaded (in a worker thread, while the old one goes on
answering) and started before the routes switch to it in one assignment; a version no longer wanted leaves
the routes at once and is shut down only when nothing uses it: no request routed to it is still open (each
request holds the version it was given until its trace ends) and its engine has no sequence left.

Which variant of a split answers is `abtest.assign(weights, sticky key, salt)`: the request's `user`, else
its API key's id, so one user sees one variant for the whole test; a request with neither gets a random one.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmcycle.errors import LlmcycleError
from llmcycle.improve.abtest import assign

if TYPE_CHECKING:
    from llmcycle.improve.registry import Registry
    from llmcycle.serve.async_engine import AsyncLLMEngine

log = logging.getLogger(__name__)


class _StillBroken(Exception):
    """The plan wants a version that failed to load before."""


class RegisteredModels:
    """The registry names one server answers. `make_engine(path)` builds a (not yet started) engine;
    `add_engine(key, engine)` / `remove_engine(key)` put one into the server's engines and take it out."""

    def __init__(self, registry: Registry, names: list[str], make_engine: Callable[[str], AsyncLLMEngine],
                 poll_s: float = 2.0) -> None:
        if not names:
            raise LlmcycleError("no registry name to serve.")
        self.registry, self.names, self.make_engine, self.poll_s = registry, list(names), make_engine, poll_s
        self.routes: dict[str, dict[str, Any]] = {}  # name -> {"weights": {label: w}, "salt": str, "keys": {label: key}}
        self.engines: dict[str, AsyncLLMEngine] = {}  # engine key (NAME@N) -> engine
        self.users: dict[str, int] = {}  # engine key -> requests routed to it and not yet ended
        self.retiring: set[str] = set()
        self.add_engine: Callable[[str, AsyncLLMEngine], None] = lambda key, engine: None
        self.remove_engine: Callable[[str], None] = lambda key: None
        self.broken: set[str] = set()  # versions that failed to load: not tried again by this server

    # ---- what to serve --------------------------------------------------------------------------------

    def _plan(self) -> dict[str, dict[str, Any]]:
        """{served name: {"weights", "salt", "versions": {label: Version}}} from the registry now."""
        plan = {}
        for name in self.names:
            base, _, which = name.partition("@")
            if which:  # NAME@ALIAS or NAME@N: that one version
                v = self.registry.resolve(name)
                plan[name] = {"weights": {str(v.version): 1.0}, "salt": "", "versions": {str(v.version): v}}
            else:
                st = self.registry.state(base)
                plan[name] = {"weights": st["weights"], "salt": st["salt"], "versions": st["variants"]}
        return plan

    def load(self) -> None:
        """The first plan, loaded before the server starts (an unknown name fails here, at startup)."""
        plan = self._plan()
        self._apply(plan, self._load_missing(plan), start=False)  # the server's lifespan starts them

    def _load_missing(self, plan: dict[str, dict[str, Any]]) -> dict[str, AsyncLLMEngine]:
        """Engines for the versions the plan needs that are not loaded yet (blocking: run it in a worker
        thread while the server goes on answering from the old ones)."""
        made: dict[str, AsyncLLMEngine] = {}
        for spec in plan.values():
            for label, v in spec["versions"].items():
                key = f"{v.name}@{label}"
                if key in self.broken:  # said once already; the routes stay until the registry changes
                    raise _StillBroken(key)
                if key not in self.engines and key not in made:
                    log.info("registry: loading %s from %s", key, v.path)
                    try:
                        made[key] = self.make_engine(v.path)
                    except Exception as e:
                        self.broken.add(key)
                        raise LlmcycleError(f"{key} from {v.path} does not load ({e})") from e
        return made

    def _apply(self, plan: dict[str, dict[str, Any]], made: dict[str, AsyncLLMEngine], start: bool = True) -> None:
        """Switch to the plan: its new engines join, then the routes change in one assignment (a request
        sees the old routes or the new ones), then the versions no longer routed start retiring."""
        for spec in plan.values():
            for label, v in spec["versions"].items():
                key = f"{v.name}@{label}"
                if key in made:
                    if start:
                        made[key].start()
                    self.engines[key] = made[key]
                    self.users.setdefault(key, 0)
                    self.add_engine(key, made[key])
        routes = {name: {"weights": spec["weights"], "salt": spec["salt"],
                         "keys": {label: f"{v.name}@{label}" for label, v in spec["versions"].items()}}
                  for name, spec in plan.items()}
        if self.routes and routes != self.routes:
            log.info("registry: %s", "; ".join(f"{n} -> " + ", ".join(
                f"{k} ({w:g})" if len(r["weights"]) > 1 else k
                for k, w in zip(r["keys"].values(), r["weights"].values())) for n, r in routes.items()))
        self.routes = routes
        used = {k for r in routes.values() for k in r["keys"].values()}
        self.retiring = (self.retiring | set(self.engines)) - used

    # ---- requests -------------------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self.routes

    def pick(self, name: str, sticky: str | None) -> tuple[str, str, AsyncLLMEngine, Callable[[], None]]:
        """(engine key, variant label, engine, release) for a request to `name`; call `release` when the
        request has ended (its trace does), so the version it used can be retired after it."""
        route = self.routes[name]
        weights = route["weights"]
        label = next(iter(weights)) if len(weights) == 1 else assign(weights, sticky or uuid.uuid4().hex,
                                                                     route["salt"])
        return self.hold(route["keys"][label])

    def hold(self, key: str) -> tuple[str, str, AsyncLLMEngine, Callable[[], None]]:
        """The engine `key` (NAME@N) held by one request until `release` is called."""
        self.users[key] = self.users.get(key, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.users[key] -= 1

        return key, key.rpartition("@")[2], self.engines[key], release

    def variant(self, key: str) -> str | None:
        """The version label of an engine key of ours (`chat@3` -> "3"), else None."""
        return key.rpartition("@")[2] if key in self.engines else None

    # ---- following the registry -----------------------------------------------------------------------

    async def follow(self) -> None:
        """Poll the registry until cancelled; switch routes, retire what nothing uses."""
        while True:
            await asyncio.sleep(self.poll_s)
            await self.refresh()

    async def refresh(self) -> None:
        """Read the registry once: switch to what it says, and retire the versions nothing uses any more."""
        try:
            plan = await asyncio.to_thread(self._plan)
            made = await asyncio.to_thread(self._load_missing, plan)
            self._apply(plan, made)
        except _StillBroken:
            pass
        except Exception as e:  # noqa: BLE001 - an unreadable registry or a version that fails to load
            log.warning("registry: cannot switch, serving as before: %s", e)  # must not stop the old one
        for key in sorted(self.retiring):
            engine = self.engines[key]
            if self.users.get(key, 0) == 0 and engine.num_in_flight == 0:
                self.retiring.discard(key)
                del self.engines[key]
                self.users.pop(key, None)
                self.remove_engine(key)
                await engine.shutdown(drain=True, timeout=30)
                log.info("registry: %s retired", key)
