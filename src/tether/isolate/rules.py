"""The namespace's nftables ruleset: all TCP to the agent, DNS to the responder, nothing else.

The namespace has no interface but its own ``lo`` (there is no route out
whatever these rules say); the rules make that loopback the way through
the gateway:

- ``nat`` on the output hook: every outbound TCP connection, to any address
  and port, is redirected to the agent's listener (REDIRECT keeps the
  original destination in conntrack, where the agent reads it with
  ``SO_ORIGINAL_DST``); connections to the agent's own address and port
  are left alone (the agent refuses them: they name no destination);
- ``filter`` on the output hook, default drop: only the redirected TCP to
  and from the agent's port and UDP to and from the DNS responder on
  127.0.0.1:53 pass. Anything else (other UDP, ICMP, raw sockets) is
  dropped, so a send fails with EPERM instead of going anywhere.
"""

from __future__ import annotations

TABLE = "tether_isolate"
# The agent's port inside the namespace: 15001, the outbound-capture port
# Istio's sidecar uses for the same REDIRECT pattern; any port would do,
# since the namespace is fresh and nothing else listens in it.
AGENT_PORT = 15001
DNS_PORT = 53  # where glibc's resolver sends queries for "nameserver 127.0.0.1"
RESOLV_CONF = "nameserver 127.0.0.1\noptions attempts:2 timeout:5\n"


def ruleset(agent_port: int = AGENT_PORT, dns_port: int = DNS_PORT) -> str:
    """The ruleset as ``nft -f`` reads it (one table, family inet: IPv4 and IPv6)."""
    if not 0 < agent_port < 65536 or not 0 < dns_port < 65536:
        raise ValueError(f"ports must be 1-65535: agent {agent_port}, dns {dns_port}")
    return f"""\
table inet {TABLE} {{
    chain nat_out {{
        type nat hook output priority -100; policy accept;
        ip daddr 127.0.0.1 tcp dport {agent_port} return
        ip6 daddr ::1 tcp dport {agent_port} return
        meta l4proto tcp redirect to :{agent_port}
    }}
    chain filter_out {{
        type filter hook output priority 0; policy drop;
        oif "lo" tcp dport {agent_port} accept
        oif "lo" tcp sport {agent_port} accept
        oif "lo" ip daddr 127.0.0.1 udp dport {dns_port} accept
        oif "lo" ip saddr 127.0.0.1 udp sport {dns_port} accept
    }}
}}
"""
