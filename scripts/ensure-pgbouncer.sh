# Run by scripts/bootstrap.sh: make Postgres (127.0.0.1:5432) and the pgbouncer
# binary available for the database tests. Idempotent and quick when both are there.
#
# pgbouncer comes from Debian's package; its own service must not start (tests
# run private instances on free ports), so the install runs behind a
# policy-rc.d that denies service starts, and any instance the package started
# anyway is stopped.
set -euo pipefail

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "ensure-pgbouncer: need root for: $*" >&2; return 1; fi
}

if ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then
    echo "ensure-pgbouncer: installing Debian's pgbouncer" >&2
    policy=/usr/sbin/policy-rc.d
    added_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod 755 "$policy"
        added_policy=1
    fi
    status=0
    as_root env DEBIAN_FRONTEND=noninteractive sh -c \
        'apt-get update -qq && apt-get install -y -qq pgbouncer >/dev/null' || status=$?
    if [ "$added_policy" = 1 ]; then as_root rm -f "$policy"; fi
    [ "$status" = 0 ] || exit "$status"
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
    pg_up || echo "ensure-pgbouncer: Postgres is not reachable on 127.0.0.1:5432" >&2
fi
exit 0
