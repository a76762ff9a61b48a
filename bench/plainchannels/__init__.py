"""Contender (c): a plain Django Channels consumer, ``group_send`` per message, no persistence."""
