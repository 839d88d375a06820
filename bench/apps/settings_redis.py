"""Settings for the redis burst servers, channels_mini's and Channels 4's alike.

One channels_redis core layer on the Redis at ``BENCH_REDIS_URL`` (the bench's own
``redis-server``), with channels_redis's default CONFIG apart from ``hosts``: capacity 100,
expiry 60 s, group_expiry 86400 s. channels_mini tunes that layer itself when it starts
(the per-process inbox capacity, waiting connection pools); Channels 4 uses it as it is.
channels_redis says at INFO only when a group send skips a full channel: that logger is at
INFO here, so the Channels 4 server's log counts its drops (channels_mini counts them in
``stats()["dropped"]`` and logs a warning instead).
"""

import os

from bench.apps.settings_common import *  # noqa: F401,F403
from bench.apps.settings_common import LOGGING

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")]},
    },
}

LOGGING = {**LOGGING, "loggers": {"channels_redis.core": {"level": "INFO"}}}
