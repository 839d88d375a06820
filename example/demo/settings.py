"""Django settings for the channels_mini demo.

A development setup: SQLite, DEBUG on, a fixed secret key. Read the
"Deployment checklist" in Django's docs before putting anything like this
online. Environment variables the demo reads:

- DEMO_DB_PATH: the SQLite file (default: example/db.sqlite3). The browser
  test points it at a fresh temporary file.
- DEMO_DEBUG: "0" turns DEBUG off.
- DJANGO_SECRET_KEY: overrides the development key.
- DEMO_REDIS_URL: a Redis server, e.g. redis://127.0.0.1:6379. Set, the demo
  uses it as its channel layer (channels_redis: pip install -e '.[redis]')
  and as the cache of its "Here now" lists, so the chat rooms' history
  outlives a server restart and several server processes can share the work.
"""
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get(
    "DJANGO_SECRET_KEY", "demo-only-insecure-key-change-me-before-deploying"
)
DEBUG = os.environ.get("DEMO_DEBUG", "1") != "0"

# WebSocket handshakes are checked against these hosts too: channels_mini
# rejects a socket whose Origin header names another host (HTTP 403).
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "chat",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "demo.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Plain Django serves the pages (WSGI_APPLICATION is unused: the demo runs
# under an ASGI server, see demo/asgi.py).
ASGI_APPLICATION = "demo.asgi.application"

# Where channels_mini's module-level `application` looks for routes. The demo
# builds its own Application in demo/asgi.py, but keeps the setting so that
# `python -m channels_mini runworker --settings demo.settings` finds them too.
CHANNEL_ROUTING = "demo.routing.channel_routing"

# No CHANNEL_LAYERS: channels_mini then uses one in-process layer, which is all
# a single uvicorn process needs. The chat rooms' "Here now" lists
# (channels_mini's presence) then live in this process's memory too.
#
# With DEMO_REDIS_URL set, both move to that Redis server: the channel layer is
# channels_redis's, configured the way Channels does, and presence uses a
# shared cache (Django's RedisCache), so every process sees every socket.
# (HEARTBEAT and TIMEOUT, in seconds, could go beside "CACHE"; the defaults
# are 5 and 20.)
DEMO_REDIS_URL = os.environ.get("DEMO_REDIS_URL")
if DEMO_REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [DEMO_REDIS_URL]},
        }
    }
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "presence": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                     "LOCATION": DEMO_REDIS_URL},
    }
    CHANNELS_MINI_PRESENCE = {"CACHE": "presence"}

# History of the chat rooms' groups (chat.consumers.room_group(): "chat-"
# plus the room): the last 200 messages of each room, for 300 seconds. The
# chat consumer is `resumable`, so a page that reconnects within that window
# (a dropped Wi-Fi, a laptop lid, the room's "Drop connection" button) gets
# what it missed; after longer, or after a server restart (the in-process
# layer keeps history in memory), the page is told it lost messages instead.
# With DEMO_REDIS_URL (the Redis layer above) the history lives in Redis and
# outlives a restart of the web server: a page that comes back within the
# TTL catches up on every line.
CHANNELS_MINI_HISTORY = {"chat-*": {"SIZE": 200, "TTL": 300}}

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DEMO_DB_PATH") or BASE_DIR / "db.sqlite3",
        "OPTIONS": {
            # Consumers run in worker threads while views write too; WAL and
            # IMMEDIATE transactions keep SQLite from answering "database is
            # locked" when two of them write at once.
            "init_command": "PRAGMA journal_mode=WAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        },
    }
}

AUTH_PASSWORD_VALIDATORS = []  # the demo's superuser is admin/admin

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        # Consumer exceptions (with tracebacks) and refused sockets land here.
        "channels_mini": {"handlers": ["console"], "level": "INFO"},
        "chat": {"handlers": ["console"], "level": "INFO"},
    },
}
