"""Minimal Django settings for contender (c): Channels only, no database, no middleware."""

import os

SECRET_KEY = "bench-plain-channels-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["channels"]
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
ASGI_APPLICATION = "bench.plainchannels.asgi.application"
ROOT_URLCONF = "bench.plainchannels.urls"

_redis = os.environ.get("PLAIN_REDIS_URL", "")
if _redis:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [_redis], "capacity": 10000, "prefix": "benchplain"},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
LOGGING = {"version": 1, "disable_existing_loggers": False}
