#!/usr/bin/env bash
# Loads one page in headless Chromium with no network beyond 127.0.0.1, writes a
# screenshot of it, and prints the page's DOM after loading on stdout. The tests
# use it to check that the router's status page and loadgen's HTML report render
# in a real browser from nothing but themselves.
#
#   scripts/headless.sh URL SCREENSHOT.png > dom.html
#
# Exits 3 when no Chromium is installed (Debian's `chromium`, which
# scripts/setup.sh installs), so a caller can tell "no browser" from "failed".
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 URL SCREENSHOT.png" >&2
    exit 2
fi
url=$1
shot=$2

browser=$(command -v chromium || command -v chromium-browser || true)
if [[ -z $browser ]]; then
    echo "headless: no chromium found (Debian package \`chromium\`; scripts/setup.sh installs it)" >&2
    exit 3
fi

profile=$(mktemp -d "${TMPDIR:-/tmp}/cellplane-chromium.XXXXXX")
trap 'rm -rf "$profile"' EXIT

# No network: every host name fails to resolve and anything not on 127.0.0.1
# goes to a proxy that does not exist, so a page that needs an external asset
# renders without it (and the caller's checks of its content fail).
# --no-sandbox: the tests run as root (CI), where Chromium's sandbox refuses to start.
flags=(
    --headless
    --no-sandbox
    --disable-gpu
    --disable-dev-shm-usage
    --no-first-run
    --no-default-browser-check
    --disable-extensions
    --disable-background-networking
    --disable-component-update
    --user-data-dir="$profile"
    --host-resolver-rules="MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"
    --proxy-server="http://127.0.0.1:9"
    --proxy-bypass-list="127.0.0.1;localhost"
    --window-size=1280,1400
)

# Chromium logs its own noise on stderr; show it only when a step fails.
log=$profile/chromium.log
if ! timeout 90 "$browser" "${flags[@]}" --screenshot="$shot" "$url" >"$log" 2>&1; then
    cat "$log" >&2
    echo "headless: chromium failed to screenshot $url" >&2
    exit 1
fi
if [[ ! -s $shot ]]; then
    cat "$log" >&2
    echo "headless: chromium wrote no screenshot of $url" >&2
    exit 1
fi
if ! timeout 90 "$browser" "${flags[@]}" --dump-dom "$url" 2>"$log"; then
    cat "$log" >&2
    echo "headless: chromium failed to load $url" >&2
    exit 1
fi
