"""The contract every long-lived resource keeps (pool, session set, task, bus).

A resource has one owner: the app's resources object (see ``ghar_core.asgi``)
starts resources in order, stops them in reverse and asks each for readiness.
Services implement this protocol; they never start each other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar, Union, overload, runtime_checkable

__all__ = ["LifecycleError", "Resource", "ResourceFactory", "ResourceNotFound", "Resources"]

logger = logging.getLogger(__name__)

R = TypeVar("R")


@runtime_checkable
class Resource(Protocol):
    """Something the lifespan starts, stops and checks.

    ``name`` is unique within an app and names the readiness check.
    ``start`` must leave the resource usable (or usable lazily, recovering on
    its own when a dependency comes back); ``stop`` must be idempotent and
    release everything; ``check`` raises when the resource cannot serve now
    (the readiness endpoint turns that into a 503 naming the check).
    """

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def check(self) -> None: ...


#: A callable given the resources added so far that returns a resource: how a
#: resource uses the ones started before it (``Geocoder`` with
#: ``def __init__(self, resources: Resources)`` is one).
ResourceFactory = Callable[["Resources"], Resource]
ResourceSpec = Union[Resource, ResourceFactory]  # noqa: UP007 - a runtime alias of a forward ref


class ResourceNotFound(KeyError):
    """``Resources.get`` was asked for a name no resource has."""

    def __str__(self) -> str:
        # KeyError's default repr-quotes the message; keep it readable.
        return str(self.args[0]) if self.args else "resource not found"


class LifecycleError(Exception):
    """One or more resources failed to start or stop.

    ``failures`` pairs each resource name with its exception, in the order
    they happened; the message lists them all, so one log line says
    everything that went wrong.
    """

    def __init__(self, action: str, failures: list[tuple[str, BaseException]]) -> None:
        self.action = action
        self.failures = tuple(failures)
        listed = "; ".join(f"{name}: {type(exc).__name__}: {exc}" for name, exc in failures)
        super().__init__(f"{len(failures)} resource(s) failed to {action}: {listed}")


class Resources:
    r"""The one owner of an app's long-lived resources.

    ``start()`` starts them in the given order, each bounded by
    ``step_timeout`` seconds; if one fails, those already started are
    stopped again (in reverse) and :class:`LifecycleError` is raised, so a
    failed start leaves nothing open and can simply be retried.
    ``stop()`` stops the started ones in reverse order, each bounded, and
    attempts every stop even after one fails; the failures are collected
    into a single :class:`LifecycleError`. Both are idempotent.

    ``get(name)`` is how handlers and services find a resource; names are
    unique (a duplicate is refused at construction). An item may also be a
    :data:`ResourceFactory`: it is called with this object while it holds only
    the resources before it, so what it ``get``\ s has started by the time
    its own ``start`` runs (and asking for a later one fails at build time).
    """

    def __init__(
        self, resources: Iterable[ResourceSpec] = (), *, step_timeout: float = 10.0
    ) -> None:
        if step_timeout <= 0:
            raise ValueError(f"step_timeout must be positive, got {step_timeout!r}")
        self.step_timeout = step_timeout
        self._items: list[Resource] = []
        self._by_name: dict[str, Resource] = {}
        self._started: list[Resource] = []
        for resource in resources:
            self.add(resource)

    def add(self, resource: ResourceSpec) -> Resource:
        """Append ``resource`` (or build it from a factory); it starts after those before it."""
        # A class is a factory too (it has the protocol's attributes, unbound).
        if isinstance(resource, type) or (
            callable(resource) and not isinstance(resource, Resource)
        ):
            resource = resource(self)
        name = getattr(resource, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{resource!r} has no usable `name`; every resource needs one")
        if name in self._by_name:
            raise ValueError(f"two resources are named {name!r}; names must be unique")
        self._items.append(resource)
        self._by_name[name] = resource
        return resource

    @overload
    def get(self, name: str) -> Resource: ...

    @overload
    def get(self, name: str, kind: type[R]) -> R: ...

    def get(self, name: str, kind: type[Any] | None = None) -> Any:
        """The resource called ``name``; :class:`ResourceNotFound` lists the known ones.

        With ``kind`` (``get("database", Database)``) the result is checked and
        typed as that class, so handlers get a typed object without a cast.
        """
        try:
            resource = self._by_name[name]
        except KeyError:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise ResourceNotFound(
                f"no resource named {name!r} (known so far: {known}); pass it to "
                "create_app(resources=[...]) (they start after the core's defaults, in order), "
                "before any resource that uses it"
            ) from None
        if kind is not None and not isinstance(resource, kind):
            raise TypeError(
                f"resource {name!r} is a {type(resource).__name__}, not a {kind.__name__}"
            )
        return resource

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Resource]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def names(self) -> tuple[str, ...]:
        """Names in start order."""
        return tuple(r.name for r in self._items)

    @property
    def started(self) -> tuple[Resource, ...]:
        """The resources started and not yet stopped, in start order."""
        return tuple(self._started)

    async def start(self) -> None:
        """Start every resource not yet started, in order (see the class doc)."""
        for resource in self._items:
            if any(resource is r for r in self._started):
                continue
            try:
                async with asyncio.timeout(self.step_timeout):
                    await resource.start()
            except Exception as exc:
                failure: BaseException = exc
                if isinstance(exc, TimeoutError):
                    failure = TimeoutError(f"did not start within {self.step_timeout:g} s")
                failures: list[tuple[str, BaseException]] = [(resource.name, failure)]
                failures.extend(await self._stop_started())
                raise LifecycleError("start", failures) from exc
            self._started.append(resource)

    async def stop(self) -> None:
        """Stop the started resources in reverse order, every one attempted."""
        failures = await self._stop_started()
        if failures:
            raise LifecycleError("stop", failures)

    async def _stop_started(self) -> list[tuple[str, BaseException]]:
        failures: list[tuple[str, BaseException]] = []
        while self._started:
            resource = self._started.pop()
            try:
                async with asyncio.timeout(self.step_timeout):
                    await resource.stop()
            except TimeoutError:
                failures.append(
                    (resource.name, TimeoutError(f"did not stop within {self.step_timeout:g} s"))
                )
            except Exception as exc:
                failures.append((resource.name, exc))
        return failures

    async def check(self, *, limit: float | None = None) -> dict[str, BaseException | None]:
        """Run every started resource's ``check`` concurrently, each bounded.

        ``limit`` bounds each check (default ``step_timeout``). Returns name ->
        ``None`` (ready) or the exception; never raises.
        """
        bound = self.step_timeout if limit is None else limit

        async def one(resource: Resource) -> BaseException | None:
            try:
                async with asyncio.timeout(bound):
                    await resource.check()
            except TimeoutError:
                return TimeoutError(f"check did not finish within {bound:g} s")
            except Exception as exc:
                return exc
            return None

        started = list(self._started)
        results = await asyncio.gather(*(one(r) for r in started))
        return {r.name: res for r, res in zip(started, results, strict=True)}
