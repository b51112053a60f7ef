"""The worker: take a pickled SMTP session off the queue and finish the mail.

The session was opened by another process (which may have exited since);
``pickle.loads`` resumes it here with this process's own tether credentials,
and the SMTP server sees one uninterrupted conversation. Run by run.py, or
by hand::

    python worker.py --redis-key some-list
"""

from __future__ import annotations

import argparse
import os
import pickle

import tether

MESSAGE = (
    "From: producer@mail.test\r\n"
    "To: worker@mail.test\r\n"
    "Subject: finished by the worker\r\n"
    "\r\n"
    "The producer said EHLO, MAIL FROM and RCPT TO; the worker sent DATA.\r\n"
)


def work(queue: object, timeout: float = 30.0) -> None:
    tether.install()  # this process's own credentials; the payload carries none
    payload = queue.get(timeout=timeout)  # type: ignore[attr-defined]
    client = pickle.loads(payload)
    print(
        f"worker (pid {os.getpid()}): resumed the SMTP session to "
        f"{client.sock.getpeername()}"
    )
    code, reply = client.data(MESSAGE)
    print(f"worker: DATA -> {code} {reply.decode()}")
    client.quit()
    print("worker: QUIT, done")


def main() -> None:
    from jobqueue import RedisQueue

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-key", required=True)
    args = parser.parse_args()
    work(RedisQueue(args.redis_key))


if __name__ == "__main__":
    main()
