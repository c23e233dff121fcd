#!/usr/bin/env bash
# The main job on a fresh clone: set up, then serve Hivewire on the embedded SQLite default
# (var/hivewire.db, migrations applied) at http://127.0.0.1:8000. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export DATABASE_URL="${DATABASE_URL:-sqlite:///var/hivewire.db}"
export PUBLIC_URL="${PUBLIC_URL:-http://127.0.0.1:8000}"
echo "Hivewire: open ${PUBLIC_URL} — the first account you sign up becomes the organizer."
exec .venv/bin/hivewire-server serve --host 127.0.0.1 --port 8000 "$@"
