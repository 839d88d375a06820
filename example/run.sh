#!/usr/bin/env bash
# Runs the channels_mini demo on http://127.0.0.1:8000 (or $PORT).
#
#   bash example/run.sh
#
# 1. installs channels_mini and uvicorn into the active Python
#    (pip install -e '.[demo]'; a virtualenv is a good idea),
# 2. creates or migrates the SQLite database (example/db.sqlite3),
# 3. creates the superuser admin / admin if there is none,
# 4. serves the site, WebSockets included, with uvicorn.
#
# Environment: PYTHON (default: python3), HOST (127.0.0.1), PORT (8000),
# DEMO_SKIP_INSTALL=1 to skip step 1, DEMO_DB_PATH for another database file,
# DEMO_REDIS_URL (e.g. redis://127.0.0.1:6379) to use that Redis server as the
# channel layer and the "Here now" cache: chat rooms then catch up on every
# line after a server restart (step 1 then installs channels_redis too).
set -euo pipefail

EXAMPLE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$EXAMPLE_DIR")"
PYTHON="${PYTHON:-python3}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"
EXTRAS="demo"
if [ -n "${DEMO_REDIS_URL:-}" ]; then
    EXTRAS="demo,redis"
fi

if [ "${DEMO_SKIP_INSTALL:-0}" != "1" ]; then
    echo "==> Installing channels_mini[$EXTRAS] (uvicorn${DEMO_REDIS_URL:+ and channels_redis})"
    if ! (cd "$REPO_ROOT" && "$PYTHON" -m pip install --quiet -e ".[$EXTRAS]"); then
        echo "run.sh: pip could not install into $("$PYTHON" -c 'import sys; print(sys.prefix)')." >&2
        echo "  Use a virtualenv:  python3 -m venv .venv && . .venv/bin/activate && bash example/run.sh" >&2
        echo "  or install Django and uvicorn yourself and run with DEMO_SKIP_INSTALL=1." >&2
        exit 1
    fi
fi

cd "$EXAMPLE_DIR"

echo "==> Migrating the database"
"$PYTHON" manage.py migrate --noinput

if "$PYTHON" manage.py shell -c "
import sys
from django.contrib.auth import get_user_model
sys.exit(0 if get_user_model().objects.filter(username='admin').exists() else 1)
" >/dev/null 2>&1; then
    echo "==> Superuser admin exists"
else
    echo "==> Creating the superuser admin / admin (for /admin/ only; change it for anything real)"
    DJANGO_SUPERUSER_PASSWORD=admin "$PYTHON" manage.py createsuperuser \
        --noinput --username admin --email admin@example.com
fi

echo
echo "==> channels_mini demo: http://$HOST:$PORT/   (admin: http://$HOST:$PORT/admin/, admin / admin)"
echo "    Open a chat room or the live list in two windows. Ctrl-C stops the server."
echo "    In a room, \"Drop connection\" cuts that window's socket: talk in the other, watch it catch up."
if [ -n "${DEMO_REDIS_URL:-}" ]; then
    echo "    Channel layer and \"Here now\": Redis at $DEMO_REDIS_URL. Restart the server: the rooms catch up."
else
    echo "    Set DEMO_REDIS_URL=redis://127.0.0.1:6379 to let the rooms catch up after a server restart too."
fi
echo
# --ws-max-size: the same limit as Application(max_message_size=1_048_576), so uvicorn refuses
# larger frames before buffering them (its own default is 16 MiB).
# An open /live/events/ stream (the live list's EventSource fallback, /items/?transport=sse)
# never ends by itself: on Ctrl-C uvicorn waits for it ("Waiting for connections to close");
# close that tab, or press Ctrl-C again to quit at once.
exec "$PYTHON" -m uvicorn demo.asgi:application --app-dir "$EXAMPLE_DIR" --host "$HOST" --port "$PORT" \
    --ws-max-size 1048576
