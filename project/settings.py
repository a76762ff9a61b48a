"""Baton settings, read from the environment.

Default: SQLite (WAL) + the in-memory channel layer, one process, no external service.
`DATABASE_URL=postgres://…` switches to Postgres, `REDIS_URL=redis://…` to channels-redis.
"""

import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


DEBUG = env_bool("DEBUG", False)
SECRET_KEY = os.environ.get("SECRET_KEY", "baton-insecure-development-key-change-me-in-production")
ALLOWED_HOSTS = [
    h.strip() for h in os.environ.get("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",")
]
CSRF_TRUSTED_ORIGINS = [
    o.strip() for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()
]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "channels",
    "sessions_app",
    "handover",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
ASGI_APPLICATION = "project.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
        # 0 under ASGI: each request runs in its own thread, so persistent connections leak.
        conn_max_age=env_int("DB_CONN_MAX_AGE", 0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets readers run beside the writer; IMMEDIATE takes the write lock up front so two
    # writers queue on busy_timeout instead of deadlocking on a lock upgrade.
    # Keep SQLite connections: opening one per call costs a file open and an fdatasync each time
    # (a connection left in a finished request's thread is closed when that thread goes).
    DATABASES["default"]["CONN_MAX_AGE"] = env_int("DB_CONN_MAX_AGE", 600)
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL;PRAGMA synchronous=NORMAL",
    }
    DATABASES["default"]["TEST"] = {
        "NAME": os.environ.get("BATON_TEST_SQLITE", str(BASE_DIR / "test-db.sqlite3"))
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A psycopg pool: connections are reused across the per-request threads ASGI uses.
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env_int("DB_POOL_MIN", 2),
        "max_size": env_int("DB_POOL_MAX", 20),
        "timeout": 30,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    # Pub/sub: one PUBLISH per fan-out message and no per-channel lists to expire or cap. A
    # message lost while a worker is disconnected is repaired from the database by the hub.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {
                # Bounded connects and reads: an unreachable Redis fails fast instead of hanging
                # the hub's sender (publishes are durable in the database regardless).
                "hosts": [
                    {
                        "address": REDIS_URL,
                        "socket_connect_timeout": float(
                            os.environ.get("BATON_REDIS_CONNECT_TIMEOUT", "2")
                        ),
                        "socket_timeout": float(os.environ.get("BATON_REDIS_TIMEOUT", "5")),
                    }
                ],
                "prefix": os.environ.get("BATON_REDIS_PREFIX", "baton"),
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

AUTH_PASSWORD_VALIDATORS: list[dict[str, str]] = []
LOGIN_URL = "/console/login/"
LOGIN_REDIRECT_URL = "/console/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "staticfiles"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["sessions_app.auth.BatonAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["sessions_app.auth.IsAuthenticatedPrincipal"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "sessions_app.api.exception_handler",
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Baton API",
    "DESCRIPTION": "Durable sessions for AI agents, with human handover.",
    "VERSION": "1",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "WARNING")},
}

# Baton knobs.
BATON_SERVE_STATIC = env_bool("BATON_SERVE_STATIC", True)
BATON_MAX_EVENT_BYTES = env_int("BATON_MAX_EVENT_BYTES", 65536)
BATON_MAX_FRAME_BYTES = env_int("BATON_MAX_FRAME_BYTES", 4 * 65536)
BATON_MAX_BATCH_EVENTS = env_int("BATON_MAX_BATCH_EVENTS", 500)
BATON_MAX_BUFFERED_EVENTS = env_int("BATON_MAX_BUFFERED_EVENTS", 20000)
# Group commit under concurrent load: a batch waits until it holds BATCH publishes or its oldest
# has waited WINDOW seconds (the most latency it adds); a lone stream never waits. While the
# process nears one core of CPU, BATCH grows up to BATCH_MAX (sessions_app.writer.BatchSizer).
BATON_GROUP_COMMIT_WINDOW = float(os.environ.get("BATON_GROUP_COMMIT_WINDOW", "0.045"))
BATON_GROUP_COMMIT_BATCH = env_int("BATON_GROUP_COMMIT_BATCH", 22)
BATON_GROUP_COMMIT_BATCH_MAX = env_int("BATON_GROUP_COMMIT_BATCH_MAX", 384)
# Several workers (a remote channel layer): a worker whose own streaming publishes are few
# (under ~0.45 of BATCH per WINDOW) hands them to the oldest live worker, which commits them in
# its own batches (sessions_app.writer.Forwarder); one it does not answer within
# FORWARD_TIMEOUT seconds is committed by its own worker instead, never twice.
BATON_FORWARD_COMMITS = env_bool("BATON_FORWARD_COMMITS", True)
BATON_FORWARD_TIMEOUT_SECONDS = float(os.environ.get("BATON_FORWARD_TIMEOUT_SECONDS", "2"))
# Embedded SQLite: commit streaming batches on the event loop (sessions_app.writer.LoopLane).
BATON_SQLITE_LOOP_WRITES = env_bool("BATON_SQLITE_LOOP_WRITES", True)
BATON_REPLAY_PAGE = env_int("BATON_REPLAY_PAGE", 1000)
BATON_HEARTBEAT_SECONDS = float(os.environ.get("BATON_HEARTBEAT_SECONDS", "3"))
BATON_WORKER_TIMEOUT_SECONDS = float(os.environ.get("BATON_WORKER_TIMEOUT_SECONDS", "10"))
BATON_REAP_SECONDS = float(os.environ.get("BATON_REAP_SECONDS", "1"))
BATON_HEAD_CHECK_SECONDS = float(os.environ.get("BATON_HEAD_CHECK_SECONDS", "2"))
BATON_CLIENT_TOKEN_MAX_TTL = env_int("BATON_CLIENT_TOKEN_MAX_TTL", 7 * 24 * 3600)
# How often each operator console socket re-reads the queue (on top of after-commit pokes).
BATON_CONSOLE_REFRESH_SECONDS = float(os.environ.get("BATON_CONSOLE_REFRESH_SECONDS", "2"))
