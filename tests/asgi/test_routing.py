"""Router and app dispatch: templates, converters, 404/405, HEAD, trailing slashes."""

from __future__ import annotations

import uuid

import pytest

from ghar_core.asgi import create_app
from ghar_core.asgi.routing import Router, compile_path
from ghar_core.config import Settings
from ghar_core.exceptions import ConflictException
from ghar_core.testing import TestClient


@pytest.fixture
def app(settings: Settings):
    app = create_app(settings, core_resources=False, resources=[])

    @app.get("/items")
    async def list_items(request):
        return [1, 2]

    @app.route("/items/{id:int}", methods=["GET", "DELETE"])
    async def item(request):
        return {"id": request.path_params["id"], "method": request.method}

    @app.get("/things/{tid:uuid}")
    async def thing(request):
        return {"tid": request.path_params["tid"]}

    @app.get("/files/{rest:path}")
    async def files(request):
        return {"rest": request.path_params["rest"]}

    @app.get("/users/{name}/posts")
    async def posts(request):
        return {"name": request.path_params["name"]}

    async def create(request):
        raise ConflictException("already there", details={"id": 1})

    app.add_route("/items", create, methods=["POST"])
    return app


async def test_static_and_typed_params(app) -> None:
    client = TestClient(app)
    assert (await client.get("/items")).json() == [1, 2]
    r = await client.get("/items/42")
    assert r.json() == {"id": 42, "method": "GET"}
    assert (await client.delete("/items/7")).json() == {"id": 7, "method": "DELETE"}
    tid = uuid.uuid4()
    assert (await client.get(f"/things/{tid}")).json() == {"tid": str(tid)}
    assert (await client.get("/files/a/b/c.txt")).json() == {"rest": "a/b/c.txt"}
    assert (await client.get("/users/zoë/posts")).json() == {"name": "zoë"}


async def test_converter_mismatch_is_404(app) -> None:
    client = TestClient(app)
    for path in ("/items/abc", "/items/-1", "/things/not-a-uuid", "/items/" + "9" * 40):
        r = await client.get(path)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "NOT_FOUND"


async def test_405_has_allow_and_envelope(app) -> None:
    r = await TestClient(app).put("/items/1")
    assert r.status_code == 405
    assert r.headers["allow"] == "DELETE, GET, HEAD"
    assert r.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert r.json()["error"]["details"]["allowed"] == ["DELETE", "GET", "HEAD"]


async def test_head_answers_get_routes_without_body(app) -> None:
    r = await TestClient(app).head("/items/3")
    assert r.status_code == 200
    assert r.content == b""
    assert r.headers["content-length"] == str(len(b'{"id":3,"method":"HEAD"}'))


async def test_trailing_slash_is_strict_with_hint(app) -> None:
    r = await TestClient(app).get("/items/")
    assert r.status_code == 404
    assert r.json()["error"]["details"]["did_you_mean"] == "/items"


async def test_not_found_details_carry_the_mount_prefix(app) -> None:
    # Mounted under /core by a host that strips the prefix: the client's paths
    # include it, so the hint must too (or following it leaves this app).
    r = await TestClient(app, root_path="/core").get("/items/")
    assert r.status_code == 404
    assert r.json()["error"]["details"] == {"path": "/core/items/", "did_you_mean": "/core/items"}


async def test_handler_api_exception_becomes_envelope(app) -> None:
    r = await TestClient(app).post("/items")
    assert r.status_code == 409
    assert r.json() == {
        "error": {"code": "CONFLICT", "message": "already there", "details": {"id": 1}}
    }


def test_bad_templates_are_refused() -> None:
    with pytest.raises(ValueError, match="must start with"):
        compile_path("items")
    with pytest.raises(ValueError, match="unknown converter 'float'"):
        compile_path("/x/{a:float}")
    with pytest.raises(ValueError, match="repeats"):
        compile_path("/x/{a}/{a}")
    with pytest.raises(ValueError, match="malformed"):
        compile_path("/x/{a")


def test_duplicate_route_and_sync_handler_are_refused(settings: Settings) -> None:
    app = create_app(settings, core_resources=False, resources=[])

    @app.get("/a")
    async def a(request):
        return {}

    with pytest.raises(ValueError, match="registered twice"):
        app.add_route("/a", a, methods=["get"])

    def sync(request):
        return {}

    with pytest.raises(TypeError, match="async"):
        app.add_route("/b", sync)


def test_router_newline_does_not_match_end() -> None:
    router: Router[str] = Router()
    router.add("/a/{x:int}", "h", ["GET"])
    assert router.match("/a/1\n") is None
    assert router.match("/a/1") is not None


async def test_dict_and_list_subclasses_are_json(settings: Settings) -> None:
    # "may return a dict or list": a defaultdict/OrderedDict is one; it used to be a 500.
    import collections

    app = create_app(settings, core_resources=False, resources=[])

    @app.get("/dd")
    async def dd(request):
        d: collections.defaultdict[str, int] = collections.defaultdict(int)
        d["a"] += 1
        return d

    @app.get("/od")
    async def od(request):
        return collections.OrderedDict(b=2)

    class Items(list):
        pass

    @app.get("/li")
    async def li(request):
        return Items([1])

    client = TestClient(app)
    assert (await client.get("/dd")).json() == {"a": 1}
    assert (await client.get("/od")).json() == {"b": 2}
    r = await client.get("/li")
    assert (r.status_code, r.json(), r.headers["content-type"]) == (200, [1], "application/json")
    h = await client.head("/dd")
    assert (h.status_code, h.content) == (200, b"")
