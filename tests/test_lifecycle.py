"""Resources: start in order, stop in reverse, bounded steps, every stop attempted."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ghar_core.lifecycle import LifecycleError, Resource, ResourceNotFound, Resources


class Probe:
    """A real (in-memory) resource that records what happened to it."""

    def __init__(self, name: str, log: list[str], *, fail_start=False, fail_stop=False, hang=False):
        self.name = name
        self.log = log
        self.fail_start = fail_start
        self.fail_stop = fail_stop
        self.hang = hang

    async def start(self) -> None:
        self.log.append(f"start {self.name}")
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail_start:
            raise RuntimeError(f"{self.name} cannot start")

    async def stop(self) -> None:
        self.log.append(f"stop {self.name}")
        if self.fail_stop:
            raise RuntimeError(f"{self.name} cannot stop")

    async def check(self) -> None:
        pass


def test_probe_is_a_resource() -> None:
    assert isinstance(Probe("a", []), Resource)


async def test_order_and_idempotence() -> None:
    log: list[str] = []
    res = Resources([Probe("a", log), Probe("b", log), Probe("c", log)])
    await res.start()
    await res.start()
    assert [r.name for r in res.started] == ["a", "b", "c"]
    await res.stop()
    await res.stop()
    assert log == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]


async def test_failed_start_rolls_back_and_can_retry() -> None:
    log: list[str] = []
    b = Probe("b", log, fail_start=True)
    res = Resources([Probe("a", log), b, Probe("c", log)])
    with pytest.raises(LifecycleError, match="b: RuntimeError: b cannot start") as info:
        await res.start()
    assert info.value.action == "start"
    assert log == ["start a", "start b", "stop a"]
    assert res.started == ()
    b.fail_start = False
    await res.start()
    assert [r.name for r in res.started] == ["a", "b", "c"]


async def test_every_stop_attempted_and_errors_collected() -> None:
    log: list[str] = []
    res = Resources(
        [Probe("a", log, fail_stop=True), Probe("b", log), Probe("c", log, fail_stop=True)]
    )
    await res.start()
    with pytest.raises(LifecycleError) as info:
        await res.stop()
    assert [name for name, _ in info.value.failures] == ["c", "a"]
    assert log[-3:] == ["stop c", "stop b", "stop a"]


async def test_steps_are_time_bounded() -> None:
    log: list[str] = []
    res = Resources([Probe("slow", log, hang=True)], step_timeout=0.05)
    with pytest.raises(LifecycleError, match=r"did not start within 0\.05 s"):
        await res.start()


def test_get_names_and_duplicates() -> None:
    res = Resources([Probe("db", []), Probe("http", [])])
    assert res.get("db").name == "db"
    probe: Probe = res.get("db", Probe)  # typed without a cast
    assert probe.name == "db"
    with pytest.raises(TypeError, match="resource 'db' is a Probe, not a Resources"):
        res.get("db", Resources)
    assert "http" in res
    assert res.names == ("db", "http")
    with pytest.raises(
        ResourceNotFound, match="no resource named 'cache' \\(known so far: db, http\\)"
    ):
        res.get("cache")
    # The hint says what is true: pass it to create_app, before its users.
    with pytest.raises(ResourceNotFound, match=r"create_app\(resources=\[\.\.\.\]\).*before any"):
        res.get("cache")
    with pytest.raises(KeyError):
        res.get("cache")
    with pytest.raises(ValueError, match="two resources are named 'db'"):
        Resources([Probe("db", []), Probe("db", [])])
    with pytest.raises(ValueError, match="step_timeout"):
        Resources(step_timeout=0)


async def test_a_factory_gets_the_resources_before_it_started_first() -> None:
    """A factory (a class taking Resources) uses what was added before it, never after."""
    log: list[str] = []

    class User:
        name = "user"

        def __init__(self, resources: Resources) -> None:
            self.db = resources.get("db", Probe)

        async def start(self) -> None:
            log.append(f"user sees db started={self.db in res.started}")

        async def stop(self) -> None: ...

        async def check(self) -> None: ...

    res = Resources([Probe("db", log), User, lambda r: Probe("after", log)])
    assert res.names == ("db", "user", "after")
    await res.start()
    assert log[:2] == ["start db", "user sees db started=True"]
    await res.stop()
    with pytest.raises(ResourceNotFound, match="no resource named 'db' \\(known so far: none\\)"):
        Resources([User, Probe("db", log)])


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=0, max_size=6))
async def test_property_stop_mirrors_start(flags: list[tuple[bool, bool]]) -> None:
    """Whatever fails, everything started is stopped exactly once, in reverse."""
    log: list[str] = []
    probes = [Probe(f"r{i}", log, fail_start=fs, fail_stop=fp) for i, (fs, fp) in enumerate(flags)]
    res = Resources(probes)
    with contextlib.suppress(LifecycleError):
        await res.start()
    with contextlib.suppress(LifecycleError):
        await res.stop()
    started = [e.split()[1] for e in log if e.startswith("start")]
    ok_started = [n for n in started if not next(p for p in probes if p.name == n).fail_start]
    stopped = [e.split()[1] for e in log if e.startswith("stop")]
    assert stopped == list(reversed(ok_started))
    assert res.started == ()
