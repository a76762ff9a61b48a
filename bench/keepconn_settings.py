"""What-if settings for the ``a-keepconn`` experiment: Baton embedded, persistent SQLite connection.

``project/settings.py`` forces ``CONN_MAX_AGE = 0`` for SQLite, so every
``database_sync_to_async`` call opens a new sqlite3 connection (running the PRAGMA
``init_command``) and closes it afterwards; the profile of contender (a) spends about a quarter
of its samples there. This module changes only that one setting, on the bench side, to measure
what the churn costs. It is an experiment for the report, not a proposal of the exact fix.
"""

from project.settings import *  # noqa: F403
from project.settings import DATABASES

DATABASES["default"]["CONN_MAX_AGE"] = None
