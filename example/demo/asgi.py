"""The demo's ASGI entry point: `uvicorn demo.asgi:application`.

One `Application` serves the whole site. WebSocket connections become
Channels 1.x messages (websocket.connect / receive / disconnect) that the
routes in demo/routing.py hand to consumers; HTTP requests go to Django as
usual, except the one routed http.request path, /live/events/ (a
server-sent events stream answered by a consumer); the "jobs.run" channel
is consumed by a background worker inside the same process.
"""
import os
import sys
from pathlib import Path

EXAMPLE_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = EXAMPLE_DIR.parent

# Let `uvicorn demo.asgi:application --app-dir example` work from anywhere,
# and run the channels_mini.py of this repository, installed or not (as in
# manage.py).
for folder in (REPO_ROOT, EXAMPLE_DIR):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo.settings")

# 1. Set Django up before importing anything that touches models: the routing
#    imports consumers, which import the binding, which needs the Item model.
import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402

from channels_mini import Application  # noqa: E402
from demo.routing import channel_routing  # noqa: E402

# 2. HTTP: Django's own ASGI handler. In DEBUG, wrap it the way `runserver`
#    does so /static/ (the admin's CSS) is served without collectstatic. In
#    production a web server or WhiteNoise serves static files instead.
http_app = get_asgi_application()
if settings.DEBUG:
    http_app = ASGIStaticFilesHandler(http_app)

# 3. WebSockets, the /live/events/ stream and background channels: the
#    Channels 1.x routing. The Application also answers /channels_mini.js
#    itself: the reconnecting (and resuming) WebSocket client the pages load.
application = Application(channel_routing, http=http_app)
