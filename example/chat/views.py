"""Plain Django views: pages, the initial item list, and starting a job.

Nothing here is asynchronous. The one channels_mini call is
Channel("jobs.run").send(...) in start_job: outside a consumer a send happens
at once, from this request's thread, and the server's background worker
picks the message up.
"""
import re

from django.http import Http404, JsonResponse
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from channels_mini import Channel

from chat.consumers import JOBS, MAX_TEXT_LENGTH, room_group
from chat.models import Item

ROOM_PATTERN = re.compile(r"^[-a-zA-Z0-9_]{1,50}$")  # as in demo/routing.py
ROOMS = ["lobby", "random", "help"]


def index(request):
    """Show the name form and the rooms; POST stores the name in the session."""
    if request.method == "POST":
        name = request.POST.get("name", "").strip()[:30]
        if name:
            # The chat socket reads it back from message.http_session.
            request.session["name"] = name
        next_url = request.POST.get("next", "")
        if not url_has_allowed_host_and_scheme(next_url, allowed_hosts={request.get_host()}):
            next_url = "index"
        return redirect(next_url)
    next_url = request.GET.get("next", "")
    # A room link followed without a name lands here: say which room it was.
    joining = re.fullmatch(r"/chat/([-a-zA-Z0-9_]{1,50})/", next_url)
    context = {"name": request.session.get("name", ""), "rooms": ROOMS, "next": next_url,
               "joining": joining[1] if joining else ""}
    return render(request, "chat/index.html", context)


def room(request, room):
    """Show a chat room; visitors without a name pick one first, then come back."""
    if not ROOM_PATTERN.match(room):
        raise Http404("Room names are 1 to 50 letters, digits, '-' or '_'.")
    if not request.session.get("name"):
        return redirect(f"/?next=/chat/{room}/")
    context = {"room": room, "name": request.session["name"], "jobs": sorted(JOBS)}
    return render(request, "chat/room.html", context)


@require_POST
def start_job(request, room):
    """Queue a slow job whose result appears in the room, and answer at once."""
    kind = request.POST.get("kind", "")
    text = request.POST.get("text", "")[:MAX_TEXT_LENGTH]
    if kind not in JOBS or not ROOM_PATTERN.match(room):
        return JsonResponse({"error": f"unknown job kind {kind!r}"}, status=400)
    Channel("jobs.run").send({
        "kind": kind,
        "text": text,
        "reply_group": room_group(room),
        "user": request.session.get("name", ""),
    })
    return JsonResponse({"queued": kind}, status=202)


def items(request):
    """Show the live item list (its script loads the items from items.json)."""
    return render(request, "chat/items.html")


@require_GET
def items_json(request):
    """Return every item, in the shape the binding sends: pk plus its fields."""
    rows = Item.objects.values("pk", "name", "done")
    return JsonResponse({"items": list(rows)})
