#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, lint, format check, then pytest on SQLite and PostgreSQL.
# Needs PostgreSQL on 127.0.0.1:5432 (HIVEWIRE_TEST_POSTGRES_URL to point elsewhere) and Redis on 6379.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
