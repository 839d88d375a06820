"""Settings for the Channels 4 server: its default in-memory layer, default options."""

from bench.apps.settings_common import *  # noqa: F401,F403

CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
