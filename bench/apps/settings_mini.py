"""Settings for the channels_mini server.

No CHANNEL_LAYERS on purpose: channels_mini then uses its default, one process-wide
InMemoryChannelLayer with default capacity (SPEC section 1).
"""

from bench.apps.settings_common import *  # noqa: F401,F403
