# Sourced by scripts/test and scripts/run: make .venv and the machine ready.
# Idempotent and quick when nothing changed; a fresh clone needs only python3.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
STAMP=.venv/.ghar-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev,bench,sentry]'
    touch "$STAMP"
fi
# Machine services the tests need (PgBouncer, a running Postgres, ...).
for helper in scripts/ensure-*.sh; do
    if [ -e "$helper" ]; then
        bash "$helper"
    fi
done
