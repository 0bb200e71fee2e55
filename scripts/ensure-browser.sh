# Run by scripts/bootstrap.sh: what the real-browser event-stream test needs
# (tests/asgi/test_sse_browser.py). Idempotent and quick when both are there.
#
# - Debian's chromium (the browser; no tool downloads a browser build here);
# - playwright-core from npm (the driver only, it never downloads a browser),
#   installed into tests/browser/node_modules from tests/browser/package.json.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else
        echo "ensure-browser: need root for: $*" >&2; return 1; fi
}

if [ ! -x /usr/bin/chromium ]; then
    echo "ensure-browser: installing Debian's chromium" >&2
    as_root env DEBIAN_FRONTEND=noninteractive sh -c \
        'apt-get -o DPkg::Lock::Timeout=600 update -qq && apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium >/dev/null' \
        || echo "ensure-browser: could not install chromium" >&2
fi

if ! command -v npm >/dev/null; then
    echo "ensure-browser: installing Debian's nodejs and npm" >&2
    as_root env DEBIAN_FRONTEND=noninteractive sh -c \
        'apt-get -o DPkg::Lock::Timeout=600 update -qq && apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends nodejs npm >/dev/null' \
        || echo "ensure-browser: could not install npm" >&2
fi

BROWSER_DIR="$ROOT/tests/browser"
STAMP="$BROWSER_DIR/node_modules/.ghar-installed"
if command -v npm >/dev/null && { [ ! -f "$STAMP" ] || [ "$BROWSER_DIR/package.json" -nt "$STAMP" ]; }; then
    echo "ensure-browser: installing playwright-core into tests/browser" >&2
    # PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: belt and braces, playwright-core has no install hook.
    if (cd "$BROWSER_DIR" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund \
            --loglevel=error >/dev/null); then
        touch "$STAMP"
    else
        echo "ensure-browser: npm install failed" >&2
    fi
fi
exit 0
