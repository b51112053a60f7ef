"""The durable usage ledger: per app, per minute, what every gateway carried.

``ledger.Ledger`` samples the gateway's cumulative counters (the socket
registry's ``AppUsage`` and its live records) every ``[usage]
flush_interval`` seconds, attributes what changed to the current minute,
and writes it to a ``store``: a SQLite file or PostgreSQL, as idempotent
batches (docs/usage.md). ``tether usage`` (``tether.cli.usage``) reads it.

Nothing is imported here: ``tether.config`` imports ``usage.location``, and
the gateway must not pay for the store drivers unless a ledger is configured.
"""
