#!/usr/bin/env bash
# The main job on a fresh clone: set up, then run the local demo (scripts/demo.py): the server on the
# embedded SQLite default (a fresh var/demo/ each run) at http://127.0.0.1:8000, an organizer and a tiny-lm
# run, three volunteers signed in through the device grant training together on loopback. Options pass
# through (--minutes, --port, --target-batch, --max-epochs); Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
