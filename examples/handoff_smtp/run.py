"""Hand a live SMTP session from one process to another, through tether.

One command, loopback only::

    python examples/handoff_smtp/run.py                 # Redis if it answers, else multiprocessing
    python examples/handoff_smtp/run.py --queue redis   # a Redis list on 127.0.0.1:6379
    python examples/handoff_smtp/run.py --queue multiprocessing

It starts a local SMTP server (tether.demo.servers), a tether gateway
process that allows only that server (and Redis), then a producer process
that opens the SMTP session and queues it, and a worker process that takes
it off the queue and finishes the mail. It prints what each did, what the
SMTP server received, and the gateway's close record for the socket
(``handoffs=1``). Exit status 0 when the message arrived.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # producer, worker, jobqueue

from jobqueue import REDIS_HOST, REDIS_PORT, RedisQueue  # noqa: E402 - after the path is set

from tether.demo.servers import SMTPServer  # noqa: E402
from tether.devmode import GatewayProcess  # noqa: E402

APP = "mailer"
TIMEOUT = 30.0


def redis_answers() -> bool:
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=2):
            return True
    except OSError:
        return False


def gateway_config(smtp_port: int, key: str) -> str:
    # Only the SMTP server and Redis; mail.test is a name only this gateway knows.
    return f"""\
[gateway]
listen = ["127.0.0.1:0"]

[resolver]
mode = "static"

[resolver.hosts]
"mail.test" = ["127.0.0.1"]

[policy]
allow = ["127.0.0.1:{smtp_port}", "{REDIS_HOST}:{REDIS_PORT}"]

[apps.{APP}]
key = "{key}"
"""


def run_processes(kind: str, smtp_port: int) -> None:
    """The producer, then the worker: separate processes, one queue between them."""
    if kind == "redis":
        queue = RedisQueue()
        try:
            for script, extra in (
                ("producer.py", ["--smtp-port", str(smtp_port)]),
                ("worker.py", []),
            ):
                subprocess.run(
                    [sys.executable, str(HERE / script), "--redis-key", queue.key, *extra],
                    check=True, timeout=TIMEOUT,
                )
        finally:
            # Not through tether: this process is not tethered (it runs the servers).
            queue.delete()
        print(f"run: Redis list {queue.key!r} deleted")
        return
    import producer
    import worker

    ctx = multiprocessing.get_context("spawn")
    mpqueue = ctx.Queue()
    procs = [
        ctx.Process(target=producer.produce, args=(mpqueue, smtp_port), name="producer"),
        ctx.Process(target=worker.work, args=(mpqueue,), name="worker"),
    ]
    for proc in procs:  # both at once: the worker waits on the queue
        proc.start()
    for proc in procs:
        proc.join(TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"run: the {proc.name} failed (exit status {proc.exitcode})")
    mpqueue.close()
    mpqueue.join_thread()


def close_record(
    gateway: GatewayProcess, smtp_port: int, timeout: float = 5.0
) -> dict[str, object] | None:
    """The gateway's audit line for the SMTP socket, once the worker's QUIT closed it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(gateway.log):
            found = re.search(r'(\{"event":"close".*\})', line)
            if found:
                record: dict[str, object] = json.loads(found.group(1))
                if record.get("peer") == f"127.0.0.1:{smtp_port}":
                    return record
        time.sleep(0.05)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description="SMTP session handoff between processes.")
    parser.add_argument("--queue", choices=["auto", "redis", "multiprocessing"], default="auto")
    args = parser.parse_args()
    kind = args.queue
    if kind == "auto":
        kind = "redis" if redis_answers() else "multiprocessing"
    if kind == "redis" and not redis_answers():
        print(f"run: no Redis on {REDIS_HOST}:{REDIS_PORT}", file=sys.stderr)
        return 1
    print(f"run: queue = {kind}")

    key = secrets.token_urlsafe(24)
    with SMTPServer() as smtp, tempfile.TemporaryDirectory() as tmp:
        smtp_port = smtp.address[1]
        config = Path(tmp) / "tether.toml"
        config.write_text(gateway_config(smtp_port, key))
        gateway = GatewayProcess(config)
        address = gateway.start()
        print(f"run: SMTP server on 127.0.0.1:{smtp_port}, gateway on {address}")
        # The children's tether settings; this process itself is never tethered.
        os.environ.update(TETHER_GATEWAY=address, TETHER_APP=APP, TETHER_KEY=key)
        try:
            run_processes(kind, smtp_port)
            messages = smtp.wait_for_messages(1, timeout=TIMEOUT)
            record = close_record(gateway, smtp_port)
        finally:
            for name in ("TETHER_GATEWAY", "TETHER_APP", "TETHER_KEY"):
                os.environ.pop(name, None)
            gateway.stop()
    print(f"run: delivered: {len(messages)} message(s)")
    for message in messages:
        print(f"  helo={message.helo} from={message.mail_from} to={list(message.rcpt_tos)}")
        subject = next(
            (line for line in message.content.decode().splitlines() if line.startswith("Subject:")),
            "",
        )
        print(f"  {subject}")
    if record is not None:
        print(
            f"run: gateway close record: peer={record['peer']} handoffs={record['handoffs']} "
            f"bytes_out={record['bytes_out']} bytes_in={record['bytes_in']} "
            f"reason={record['reason']!r}"
        )
    ok = len(messages) == 1 and messages[0].helo == "producer.test"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
