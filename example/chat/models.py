from django.db import models


class Item(models.Model):
    """One line of the shared live list (see chat/bindings.py)."""

    name = models.CharField(max_length=200)
    done = models.BooleanField(default=False)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created", "pk"]

    def __str__(self):
        return self.name
