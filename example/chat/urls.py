from django.urls import path

from chat import views

urlpatterns = [
    path("", views.index, name="index"),
    path("chat/<slug:room>/", views.room, name="room"),
    path("chat/<slug:room>/jobs/", views.start_job, name="start_job"),
    path("items/", views.items, name="items"),
    path("items.json", views.items_json, name="items_json"),
]
