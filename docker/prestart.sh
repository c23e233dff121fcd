#!/bin/sh
# Entrypoint of the server image: wait for the database, bring its schema to the newest revision, then run
# the hivewire-server command given as arguments (the image's default: serve).
# Migrating here, before the server starts, stops the container with the error in its log when a migration
# fails, and lets one-off commands (`docker compose run --rm server make-organizer EMAIL`) find their tables.
set -eu

if [ "$#" -eq 0 ]; then
    set -- serve --host 0.0.0.0 --port 8000
fi

echo "prestart: waiting for the database"
hivewire-server wait-for-db --timeout 60
echo "prestart: applying migrations"
hivewire-server migrate

if [ "$1" = "serve" ]; then
    # Migrated just above; serve need not do it again.
    shift
    exec hivewire-server serve --no-migrate "$@"
fi
exec hivewire-server "$@"
