"""Dependencies point down: base <- services <- asgi <- cli/devtools.

Walks every module of the package and fails on an import of a higher layer
(and, among the services, of one later in DESIGN.md's order),
so a convenience import cannot quietly turn the layers into a tangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ghar_core"

LAYERS = {
    0: {
        "config",
        "logging",
        "exceptions",
        "utils",
        "constants",
        "cache",
        "lifecycle",
        "envfile",
        "error_reporting",
    },
    1: {
        "_db_session",
        "database",
        "db_resilience",
        "http",
        "jwt_verification",
        "auth",
        "users",
        "sse",
        "websocket",
        "broker",
        "migrate",
        "migrations",
    },
    2: {"asgi", "testing"},
    3: {"cli", "server", "devtools", "pytest_plugin", "__main__", "__init__"},
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def _top(module: str) -> str:
    return module.split(".")[1] if module.startswith("ghar_core.") else ""


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ghar_core":
                found.update(f"ghar_core.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
    return {name for name in found if name.startswith("ghar_core.")}


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_upward_imports(path: Path) -> None:
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    assert own in LAYER_OF, f"{own} is in no layer: add it to LAYERS in this test"
    own_layer = LAYER_OF[own]
    for module in _imports(path):
        target = _top(module)
        if target in ("", "__version__"):
            continue
        assert target in LAYER_OF, f"{module} is in no layer"
        assert LAYER_OF[target] <= own_layer, (
            f"{path.relative_to(PACKAGE)} (layer {own_layer}) imports {module} "
            f"(layer {LAYER_OF[target]}): dependencies must point down"
        )


# DESIGN.md "Layers": the services in this order; each may use the base and
# the services before it, never one after it (keep this copy in step with it).
SERVICE_ORDER = (
    "http",
    "db_resilience",
    "migrate",
    "database",
    "users",
    "jwt_verification",
    "auth",
    "broker",
    "sse",
    "websocket",
)


def _service(name: str) -> str:
    return "migrate" if name == "migrations" else name


@pytest.mark.parametrize(
    "path",
    [
        p
        for p in MODULES
        if _service(p.relative_to(PACKAGE).parts[0].removesuffix(".py")) in SERVICE_ORDER
    ],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_services_use_only_the_services_before_them(path: Path) -> None:
    own = _service(path.relative_to(PACKAGE).parts[0].removesuffix(".py"))
    rank = SERVICE_ORDER.index(own)
    for module in _imports(path):
        target = _service(_top(module))
        if target in SERVICE_ORDER and target != own:
            assert SERVICE_ORDER.index(target) < rank, (
                f"{path.relative_to(PACKAGE)} ({own}) imports {module}: {target} comes after "
                f"{own} in DESIGN.md's order of services ({', '.join(SERVICE_ORDER)})"
            )
