"""The producer: open an SMTP session through tether, pickle it into a queue, exit.

It does the first half of the mail transaction (EHLO, MAIL FROM, RCPT TO)
and leaves the rest to whoever takes the payload off the queue. Run by
run.py, or by hand (tether settings from TETHER_GATEWAY/TETHER_APP/TETHER_KEY)::

    python producer.py --smtp-port 8025 --redis-key some-list
"""

from __future__ import annotations

import argparse
import os
import smtplib

import tether
from tether.client import handoff

SENDER = "producer@mail.test"
RECIPIENT = "worker@mail.test"


def produce(queue: object, smtp_port: int, smtp_host: str = "mail.test") -> None:
    tether.install()  # gateway, app and key from this process's environment
    client = smtplib.SMTP(smtp_host, smtp_port, timeout=30)
    code, _ = client.ehlo("producer.test")
    print(f"producer (pid {os.getpid()}): connected to {client.sock.getpeername()}, EHLO {code}")
    client.mail(SENDER)
    client.rcpt(RECIPIENT)
    # handoff.dumps, not pickle.dumps: it also carries whatever smtplib's
    # buffered reader holds that the client has not consumed yet.
    payload = handoff.dumps(client)
    queue.put(payload)  # type: ignore[attr-defined]
    print(f"producer: MAIL FROM and RCPT TO done; queued a {len(payload)}-byte payload, exiting")


def main() -> None:
    from jobqueue import RedisQueue

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smtp-port", type=int, required=True)
    parser.add_argument("--smtp-host", default="mail.test")
    parser.add_argument("--redis-key", required=True)
    args = parser.parse_args()
    produce(RedisQueue(args.redis_key), args.smtp_port, args.smtp_host)


if __name__ == "__main__":
    main()
