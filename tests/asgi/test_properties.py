"""Properties: whatever a client sends, the answer is success or a valid envelope, never a
500, and X-Request-ID is always present and safe."""

from __future__ import annotations

import re

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from ghar_core.asgi import create_app
from ghar_core.testing import TestClient
from tests.asgi.conftest import make_settings
from tests.strategies import header_names, http_methods, json_bodies, latin1_values, request_paths

_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_CONTENT_TYPES = st.sampled_from(
    [None, "application/json", "text/plain", "application/x+json; charset=utf-8", "\r\n", "é/é"]
)


def _app():
    app = create_app(
        make_settings(MAX_BODY_SIZE=2048, CORS_ORIGINS=("https://a.example",)),
        core_resources=False,
        resources=[],
    )

    @app.route("/items/{id:int}", methods=["GET", "PUT", "DELETE"])
    async def item(request):
        return {"id": request.path_params["id"]}

    @app.get("/items")
    async def items(request):
        return []

    @app.post("/echo")
    async def echo(request):
        return {"json": await request.json()}

    @app.route("/raw", methods=["POST", "PUT", "PATCH"])
    async def raw(request):
        return {"size": len(await request.body())}

    @app.get("/q")
    async def q(request):
        return {"q": request.query_params.multi_items(), "h": len(request.headers)}

    return app


APP = _app()


def _check(response, sent_id: str | None) -> None:
    assert response.status_code < 500, response.text
    rid = response.headers.get("x-request-id")
    assert rid is not None
    assert _SAFE_ID.fullmatch(rid)
    if sent_id is not None and _SAFE_ID.fullmatch(sent_id):
        assert rid == sent_id
    if response.status_code >= 400 and response.content:
        error = orjson.loads(response.content)["error"]
        assert isinstance(error["code"], str)
        assert isinstance(error["message"], str)
        assert set(error) <= {"code", "message", "details"}


@settings(max_examples=150)
@given(
    method=http_methods,
    path=request_paths,
    headers=st.lists(st.tuples(header_names, latin1_values), max_size=4),
    query=st.text(max_size=30),
)
async def test_any_request_line_and_headers(method, path, headers, query) -> None:
    client = TestClient(APP)
    sent_id = next((v for k, v in headers if k == "x-request-id"), None)
    r = await client.request(method, path + ("?" + query if query else ""), headers=headers)
    _check(r, sent_id)


@settings(max_examples=150)
@given(
    path=st.sampled_from(["/echo", "/raw", "/items/1", "/echo/"]),
    body=json_bodies,
    content_type=_CONTENT_TYPES,
    request_id=latin1_values,
)
async def test_any_body(path, body, content_type, request_id) -> None:
    headers = [("x-request-id", request_id)]
    if content_type is not None:
        headers.append(("content-type", content_type))
    r = await TestClient(APP, chunk_size=512).post(path, content=body, headers=headers)
    _check(r, request_id)
    if path == "/echo" and r.status_code == 200:
        assert r.json() == {"json": orjson.loads(body)}
    if len(body) > 2048:
        assert r.status_code in (404, 405, 413, 415)
