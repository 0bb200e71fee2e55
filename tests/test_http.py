"""The shared outbound HTTP clients against real loopback aiohttp servers (HTTP and HTTPS)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from ghar_core.http import (
    CLIENT_SPECS,
    ClientSpec,
    HTTPClients,
    HTTPClientsResource,
    close_all_clients,
    get_blog_client,
    get_general_client,
    get_scraper_client,
    get_supabase_auth_http_client,
    request_timeout,
)
from ghar_core.lifecycle import Resource
from tests.tls import TLS, serve, trusting

GETTERS: dict[str, Callable[[], aiohttp.ClientSession]] = {
    "scraper": get_scraper_client,
    "blog": get_blog_client,
    "general": get_general_client,
    "supabase_auth": get_supabase_auth_http_client,
}


@dataclass
class Recorder:
    """What the loopback server saw: connections, requests, concurrency."""

    peers: set[tuple[str, int]] = field(default_factory=set)
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    # /gate holds each request until this many are in flight (or 1 s passed).
    gate_target: int = 1
    gate: asyncio.Event = field(default_factory=asyncio.Event)


def make_app(rec: Recorder) -> web.Application:
    def seen(request: web.Request) -> None:
        rec.requests += 1
        peer = request.transport.get_extra_info("peername") if request.transport else None
        rec.peers.add(tuple(peer[:2]))

    async def ok(request: web.Request) -> web.Response:
        seen(request)
        return web.Response(text="ok")

    async def slow(request: web.Request) -> web.Response:
        seen(request)
        await asyncio.sleep(float(request.query["s"]))
        return web.Response(text="slow")

    async def gate(request: web.Request) -> web.Response:
        seen(request)
        rec.in_flight += 1
        rec.max_in_flight = max(rec.max_in_flight, rec.in_flight)
        try:
            if rec.in_flight >= rec.gate_target:
                rec.gate.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rec.gate.wait(), 1.0)
            await asyncio.sleep(0.01)
        finally:
            rec.in_flight -= 1
        return web.Response(text="gate")

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/slow", slow)
    app.router.add_get("/gate", gate)
    return app


@dataclass
class Server:
    base_url: str
    rec: Recorder


@pytest.fixture
async def clients() -> AsyncIterator[HTTPClients]:
    """The running clients resource the module getters use; stopped after the test."""
    async with HTTPClients() as running:
        yield running
    assert running.open_sessions() == 0


@pytest.fixture(params=["http", "https"])
async def server(
    request: pytest.FixtureRequest, tls: TLS, clients: HTTPClients
) -> AsyncIterator[Server]:
    """A loopback server; over https the shared sessions trust its CA."""
    rec = Recorder()
    ssl_context = tls.server_context if request.param == "https" else None
    async with serve(make_app(rec), ssl_context=ssl_context) as base_url:
        with trusting(tls.client_context):
            yield Server(base_url, rec)
            await close_all_clients()


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., aiohttp.ClientSession]]:
    """Sessions of a custom domain, each from its own HTTPClients; all stopped after the test."""
    made: list[HTTPClients] = []

    def build(
        total_timeout: float = 5.0, limit: int = 3, keepalive: float = 30.0
    ) -> aiohttp.ClientSession:
        owner = HTTPClients([ClientSpec("test", total_timeout, limit, keepalive)], core=False)
        made.append(owner)
        return owner.session("test")

    yield build
    for owner in made:
        await owner.stop()


async def fetch(session: aiohttp.ClientSession, url: str, **kwargs: object) -> str:
    async with session.get(url, **kwargs) as response:  # type: ignore[arg-type]
        assert response.status == 200
        return await response.text()


# -- the table and the getters --------------------------------------------


def test_spec_table_holds_the_four_clients() -> None:
    table = {name: (spec.total_timeout, spec.limit) for name, spec in CLIENT_SPECS.items()}
    assert table == {
        "scraper": (60.0, 10),
        "blog": (120.0, 5),
        "general": (60.0, 5),
        "supabase_auth": (10.0, 10),
    }
    assert all(spec.keepalive_timeout > 0 for spec in CLIENT_SPECS.values())
    with pytest.raises(TypeError):
        CLIENT_SPECS["new"] = CLIENT_SPECS["general"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"total_timeout": 0}, "total_timeout"),
        ({"limit": 0}, "limit"),
        ({"keepalive_timeout": -1}, "keepalive_timeout"),
    ],
)
def test_bad_spec_names_the_option(kwargs: dict[str, float], option: str) -> None:
    values: dict[str, float] = {"total_timeout": 1.0, "limit": 1, "keepalive_timeout": 1.0}
    values.update(kwargs)
    with pytest.raises(ValueError, match=option):
        ClientSpec("x", **values)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(GETTERS))
async def test_getter_applies_its_spec(name: str, clients: HTTPClients) -> None:
    session = GETTERS[name]()
    spec = CLIENT_SPECS[name]
    assert session.timeout.total == spec.total_timeout
    connector = session.connector
    assert isinstance(connector, aiohttp.TCPConnector)
    assert connector.limit == spec.limit
    assert connector.limit_per_host == 0
    assert not connector.force_close
    assert GETTERS[name]() is session


@pytest.mark.parametrize("name", sorted(GETTERS))
def test_getter_without_a_running_app_fails_clearly(name: str) -> None:
    """Nothing makes a session that no one would close."""
    with pytest.raises(RuntimeError, match="no HTTP clients resource is running"):
        GETTERS[name]()


def test_session_outside_a_loop_fails_clearly() -> None:
    with pytest.raises(RuntimeError, match="inside a running event loop"):
        HTTPClients().session("general")


async def test_unknown_domain_names_the_registered_ones(clients: HTTPClients) -> None:
    with pytest.raises(KeyError, match=r"no HTTP client named 'geo'.*general.*register"):
        clients.session("geo")
    with pytest.raises(KeyError, match="geo"):
        clients.provider("geo")
    clients.register(ClientSpec("geo", total_timeout=2.0, limit=2))
    with pytest.raises(ValueError, match="already registered"):
        clients.register(ClientSpec("geo", total_timeout=2.0, limit=2))
    assert clients.provider("geo")() is clients.session("geo")


async def test_a_registered_domain_gets_its_base_url_and_timeouts(server: Server) -> None:
    spec = ClientSpec(
        "geocoder", total_timeout=3.0, limit=2, connect_timeout=1.0, base_url=server.base_url
    )
    async with HTTPClients([spec]) as owner:
        session = owner.session("geocoder")
        assert session.timeout.total == 3.0
        assert session.timeout.sock_connect == 1.0
        assert isinstance(session.connector, aiohttp.TCPConnector)
        assert session.connector.limit == 2
        assert await fetch(session, "/ok") == "ok"  # relative to the base URL
    assert session.closed
    with pytest.raises(RuntimeError, match="stopped"):
        owner.session("geocoder")


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [({"connect_timeout": 0}, "connect_timeout"), ({"base_url": "geo.internal"}, "base_url")],
)
def test_bad_domain_options_are_named(kwargs: dict[str, object], option: str) -> None:
    with pytest.raises(ValueError, match=option):
        ClientSpec("x", 1.0, 1, **kwargs)  # type: ignore[arg-type]


async def test_concurrent_first_use_creates_one_session(clients: HTTPClients) -> None:
    start = asyncio.Event()

    async def ask() -> aiohttp.ClientSession:
        await start.wait()
        return get_scraper_client()

    tasks = [asyncio.create_task(ask()) for _ in range(50)]
    await asyncio.sleep(0)
    assert clients.open_sessions() == 0  # lazy: nothing until asked
    start.set()
    sessions = await asyncio.gather(*tasks)
    assert len({id(s) for s in sessions}) == 1
    assert clients.open_sessions() == 1


async def test_close_then_use_creates_a_new_working_session(server: Server) -> None:
    first = get_general_client()
    assert await fetch(first, f"{server.base_url}/ok") == "ok"
    await close_all_clients()
    await close_all_clients()  # idempotent
    assert first.closed
    second = get_general_client()
    assert second is not first
    assert not second.closed
    assert await fetch(second, f"{server.base_url}/ok") == "ok"
    await second.close()  # closed by a caller behind our back: still recovers
    third = get_general_client()
    assert third is not second
    assert await fetch(third, f"{server.base_url}/ok") == "ok"


def test_a_session_belongs_to_its_loop_and_stop_leaves_no_socket() -> None:
    """One resource, one loop: another loop is refused, and stop closes every socket."""
    owner = HTTPClients()

    async def first() -> aiohttp.ClientSession:
        await owner.start()
        rec = Recorder()
        async with serve(make_app(rec)) as base_url:
            session = owner.session("blog")
            assert await fetch(session, f"{base_url}/ok") == "ok"  # a pooled keep-alive socket
        return session

    async def second() -> None:
        with pytest.raises(RuntimeError, match="another event loop"):
            owner.session("general")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with asyncio.Runner() as runner:
            session = runner.run(first())
            asyncio.run(second())
            runner.run(owner.stop())
            assert session.closed
        del session
        gc.collect()
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, [str(w.message) for w in leaks]


# -- over the wire -----------------------------------------------------------


async def test_connections_are_reused_sequentially(server: Server) -> None:
    session = get_supabase_auth_http_client()
    for _ in range(30):
        assert await fetch(session, f"{server.base_url}/ok") == "ok"
    assert server.rec.requests == 30
    assert len(server.rec.peers) == 1


async def test_connections_are_reused_concurrently_within_the_limit(server: Server) -> None:
    limit = CLIENT_SPECS["scraper"].limit
    session = get_scraper_client()
    for _ in range(3):
        await asyncio.gather(*(fetch(session, f"{server.base_url}/ok") for _ in range(40)))
    assert server.rec.requests == 120
    assert len(server.rec.peers) <= limit


async def test_concurrency_never_exceeds_the_limit(server: Server) -> None:
    limit = CLIENT_SPECS["general"].limit
    server.rec.gate_target = limit + 1  # unreachable if the limit holds
    session = get_general_client()
    await asyncio.gather(*(fetch(session, f"{server.base_url}/gate") for _ in range(limit + 3)))
    assert server.rec.max_in_flight == limit


async def test_per_request_timeout_overrides_a_longer_default(server: Server) -> None:
    session = get_supabase_auth_http_client()  # default 10 s
    with pytest.raises(TimeoutError):
        await fetch(session, f"{server.base_url}/slow?s=2", timeout=request_timeout(0.1))
    # The session is still healthy afterwards.
    assert await fetch(session, f"{server.base_url}/ok") == "ok"


async def test_per_request_timeout_overrides_a_shorter_default(
    server: Server, make_client: Callable[..., aiohttp.ClientSession]
) -> None:
    session = make_client(total_timeout=0.1)
    with pytest.raises(TimeoutError):
        await fetch(session, f"{server.base_url}/slow?s=0.4")
    body = await fetch(session, f"{server.base_url}/slow?s=0.4", timeout=request_timeout(3))
    assert body == "slow"


async def test_idle_keepalive_expiry_closes_idle_connections(
    server: Server, make_client: Callable[..., aiohttp.ClientSession]
) -> None:
    short = make_client(keepalive=0.05)
    long = make_client(keepalive=30.0)
    for session in (short, long):
        server.rec.peers.clear()
        await fetch(session, f"{server.base_url}/ok")
        await asyncio.sleep(0.3)
        await fetch(session, f"{server.base_url}/ok")
        assert len(server.rec.peers) == (2 if session is short else 1)


async def test_https_needs_the_trusted_ca(tls: TLS, clients: HTTPClients) -> None:
    async with serve(make_app(Recorder()), ssl_context=tls.server_context) as base_url:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await fetch(get_general_client(), f"{base_url}/ok")
        await close_all_clients()
        with trusting(tls.client_context):
            assert await fetch(get_general_client(), f"{base_url}/ok") == "ok"
            await close_all_clients()


def test_request_timeout_rejects_non_positive() -> None:
    assert request_timeout(2.5).total == 2.5
    with pytest.raises(ValueError, match="total"):
        request_timeout(0)


# -- the lifespan resource ---------------------------------------------------


async def test_resource_stop_closes_everything_and_check_is_a_noop() -> None:
    resource = HTTPClientsResource()
    assert isinstance(resource, Resource)
    assert resource.name == "http_clients"
    await resource.start()
    assert resource.open_sessions() == 0
    sessions = [getter() for getter in GETTERS.values()]
    assert resource.open_sessions() == 4
    await resource.check()
    await resource.stop()
    await resource.stop()
    assert all(s.closed for s in sessions)
    with pytest.raises(RuntimeError, match="no HTTP clients resource is running"):
        get_general_client()
    await resource.start()  # a failed app start is retried: open again
    assert not get_general_client().closed
    await resource.stop()


# -- property: interleavings of get / request / close across tasks -----------

_op = st.one_of(
    st.tuples(st.just("get"), st.sampled_from(sorted(GETTERS))),
    st.tuples(st.just("request"), st.sampled_from(sorted(GETTERS))),
    st.tuples(st.just("close_one"), st.sampled_from(sorted(GETTERS))),
    st.tuples(st.just("close_all"), st.just("")),
    st.tuples(st.just("yield"), st.just("")),
)


@settings(max_examples=30)
@given(plans=st.lists(st.lists(_op, max_size=12), min_size=1, max_size=5))
def test_interleavings_keep_one_open_session_per_client(
    plans: list[list[tuple[str, str]]],
) -> None:
    """Any interleaving: never a closed session handed out, at most one open per client."""
    returned: dict[str, list[aiohttp.ClientSession]] = {name: [] for name in GETTERS}

    def check_invariants() -> None:
        for name, sessions in returned.items():
            assert len({id(s) for s in sessions if not s.closed}) <= 1, name
        assert owner.open_sessions() <= len(GETTERS)

    def get(name: str) -> aiohttp.ClientSession:
        session = GETTERS[name]()
        assert not session.closed
        returned[name].append(session)
        check_invariants()
        return session

    async def run_plan(plan: list[tuple[str, str]], base_url: str) -> None:
        for op, name in plan:
            if op == "get":
                get(name)
            elif op == "request":
                session = get(name)
                try:
                    await fetch(session, f"{base_url}/ok")
                except (aiohttp.ClientError, RuntimeError):
                    # Only a close by another task may break a request.
                    assert session.closed
            elif op == "close_one":
                session = get(name)
                await session.close()
            elif op == "close_all":
                await close_all_clients()
            await asyncio.sleep(0)
            check_invariants()

    owner = HTTPClients()

    async def scenario() -> None:
        async with owner, serve(make_app(Recorder())) as base_url:
            try:
                async with asyncio.TaskGroup() as group:  # a failure cancels the others
                    for plan in plans:
                        group.create_task(run_plan(plan, base_url))
            finally:
                await close_all_clients()
        assert all(s.closed for sessions in returned.values() for s in sessions)

    asyncio.run(scenario())


# -- hygiene -------------------------------------------------------------------


@pytest.fixture
def collected() -> Iterator[None]:
    yield
    gc.collect()


async def test_no_unclosed_session_warning_after_close_all(
    collected: None, clients: HTTPClients
) -> None:
    # With warnings as errors, an unclosed session collected here would fail the test.
    for getter in GETTERS.values():
        getter()
    await close_all_clients()
    gc.collect()
