"""Several gateways as one service: nodes sharing a Redis (docs/deploy.md).

``config`` parses ``[cluster]`` (imported by tether.config, so it imports
nothing heavy); ``signing`` signs handoffs; ``membership`` keeps this node's
heartbeat in Redis and finds the others; ``link`` carries streams between
nodes (mutual TLS, or a Unix socket between the workers of one host);
``node`` puts them together for the gateway (``core.cluster``); ``quota``
leases global quota budget from Redis in chunks.
"""
