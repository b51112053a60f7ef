"""Standard proxy protocols as sans-I/O state machines (SOCKS5, HTTP proxy).

Each module here parses one protocol from bytes it is fed and turns the
gateway's answers into bytes; the front-ends in ``tether.gateway.frontends``
drive them on the gateway core. No sockets, no event loop.
"""
