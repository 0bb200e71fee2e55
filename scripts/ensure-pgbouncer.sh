# Run by scripts/bootstrap.sh: make the PostgreSQL server binaries, the
# pgbouncer binary and (when the machine has a cluster) Postgres on 127.0.0.1:5432
# available. Idempotent and quick when all are there.
#
# The binaries let `ghar-core dev` and the tests run a PostgreSQL of their own
# when none answers. Both come from Debian's packages; their own services must
# not start (we run private instances on free ports), so the install runs behind
# a policy-rc.d that denies service starts, and any instance started anyway is
# stopped.
set -euo pipefail

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "ensure-pgbouncer: need root for: $*" >&2; return 1; fi
}

# apt-get install "$1" with service starts denied (policy-rc.d exit 101).
apt_install_no_service() {
    local policy=/usr/sbin/policy-rc.d added_policy=0 status=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod 755 "$policy"
        added_policy=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive sh -c \
        "apt-get -o DPkg::Lock::Timeout=600 update -qq && apt-get -o DPkg::Lock::Timeout=600 install -y -qq $1 >/dev/null" || status=$?
    if [ "$added_policy" = 1 ]; then as_root rm -f "$policy"; fi
    return "$status"
}

has_pg_binaries() {
    if [ -n "${GHAR_PG_BIN:-}" ]; then [ -x "$GHAR_PG_BIN/initdb" ]; return; fi
    command -v initdb >/dev/null && return 0
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

if ! has_pg_binaries && command -v apt-get >/dev/null; then
    echo "ensure-pgbouncer: installing Debian's postgresql (for its server binaries)" >&2
    apt_install_no_service postgresql || echo "ensure-pgbouncer: could not install postgresql" >&2
fi

if ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then
    echo "ensure-pgbouncer: installing Debian's pgbouncer" >&2
    apt_install_no_service pgbouncer
    # Belt and braces: no package-managed pgbouncer may hold port 6432.
    if [ -x /etc/init.d/pgbouncer ]; then as_root /etc/init.d/pgbouncer stop >/dev/null 2>&1 || true; fi
fi

pg_up() {
    if command -v pg_isready >/dev/null; then
        pg_isready -q -h 127.0.0.1 -p 5432
    else
        (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null
    fi
}

if ! pg_up; then
    if [ -d /etc/postgresql ] && [ -n "$(ls /etc/postgresql 2>/dev/null)" ]; then
        version="$(ls /etc/postgresql | sort -V | tail -n 1)"
        echo "ensure-pgbouncer: starting Postgres $version/main" >&2
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
        for _ in $(seq 1 50); do pg_up && break; sleep 0.2; done
    fi
    pg_up || echo "ensure-pgbouncer: no Postgres on 127.0.0.1:5432; the tests start their own" >&2
fi
exit 0
