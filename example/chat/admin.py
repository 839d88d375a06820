from django.contrib import admin

from chat.models import Item


@admin.register(Item)
class ItemAdmin(admin.ModelAdmin):
    """Edits here reach every open /items/ page: saving in the admin fires the
    same post_save signal that ItemBinding listens to."""

    list_display = ["name", "done", "created"]
    list_editable = ["done"]
