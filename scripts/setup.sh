#!/usr/bin/env bash
# Installs what Hivewire needs on a fresh machine: a virtual environment with both distributions
# (editable), dev tools, torch pinned by constraints.txt; with --test also the system packages and node
# modules the test suite drives (coturn, chromium, chromium-driver, iproute2/iptables/conntrack for the
# NAT lab, the OpenID provider).
set -euo pipefail
cd "$(dirname "$0")/.."

want_test_tools=0
[ "${1:-}" = "--test" ] && want_test_tools=1

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
stamp=.venv/.hivewire-installed
inputs=$(cat pyproject.toml volunteer_client/pyproject.toml constraints.txt requirements-dev.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$inputs" ]; then
    echo "setup: installing Python packages"
    .venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt \
        -e . -e ./volunteer_client -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import hivewire_server, hivewire, torch" 
    echo "$inputs" > "$stamp"
fi

if [ "$want_test_tools" = 1 ]; then
    missing=()
    command -v turnserver >/dev/null || missing+=(coturn)
    [ -x /usr/bin/chromium ] || missing+=(chromium)
    [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v iptables >/dev/null || missing+=(iptables)
    command -v conntrack >/dev/null || missing+=(conntrack)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing Debian packages: ${missing[*]}"
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        else
            echo "setup: not root; install them yourself: apt-get install ${missing[*]}" >&2
        fi
    fi
    if [ -f tests/oidc/package.json ] && [ ! -d tests/oidc/node_modules ]; then
        echo "setup: installing the test OpenID provider (npm)"
        (cd tests/oidc && npm install --silent --no-audit --no-fund >/dev/null)
    fi
fi
