"""``tether run --isolate``: a command in a network namespace whose only way out is tether.

The pieces (docs/any-program.md):

- :mod:`~tether.isolate.names` -- the fake addresses (198.18.0.0/15) that stand for names;
- :mod:`~tether.isolate.dns` -- the namespace's DNS responder, sans-I/O;
- :mod:`~tether.isolate.rules` -- the nftables ruleset (all TCP to the agent, DNS, nothing else);
- :mod:`~tether.isolate.namespace` -- the syscalls and setup steps, with failures in words;
- :mod:`~tether.isolate.enter` -- the helper process that makes the namespace and becomes CMD;
- :mod:`~tether.isolate.agent` -- the agent serving the namespace's sockets through the gateway;
- :mod:`~tether.isolate.launch` -- ``tether run --isolate`` putting them together.
"""
