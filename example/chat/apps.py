from django.apps import AppConfig


class ChatConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "chat"

    def ready(self):
        # Import the binding so its signal receivers are connected in every
        # process that saves Items: the server (admin, views, consumers) and
        # `manage.py shell` alike. A binding starts working when its class is
        # defined, so importing the module is all it takes.
        from chat import bindings  # noqa: F401
