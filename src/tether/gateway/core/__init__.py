"""The gateway's core: admission, dialling, options, handoff, inspection, the registry.

No wire protocol and no front-end is imported here; front-ends
(``tether.gateway.frontends``) call these services. This package imports
none of its modules, so a data-plane module can import the registry alone.
"""
