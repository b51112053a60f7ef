"""One unmodified asyncio (or trio) client library, run like an app: ``python clients.py JSON``.

Started by test_aio_libraries.py as a child process with ``tether run``'s
environment (TETHER_GATEWAY/APP/KEY, TETHER_AUTOINSTALL=1 and tether's
sitecustomize on PYTHONPATH), so tether is installed before this file runs
and the script itself never mentions it. The JSON argument names the
library, the loop ("asyncio", "uvloop" or "trio") and where the services
are. Each client does real work against its service and checks the answers
itself; any failure is an exception, i.e. a non-zero exit with the
traceback on stderr. How many connections each one opens is fixed (the test
counts the gateway's audit lines against it).

Names like www.test and mail.test resolve only in the gateway's static
table: a client that resolved or connected on its own would fail here.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from typing import Any

TIMEOUT = 10.0  # any one operation; the test's own bound on the process is larger

Args = dict[str, Any]


def _context(args: Args) -> ssl.SSLContext:
    """A verifying client context that trusts only the test CA."""
    ctx = ssl.create_default_context(cafile=args["ca_file"])
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    return ctx


def _pattern(n: int) -> bytes:
    """What the demo HTTP server's /bytes/N answers (tether.demo.servers.pattern)."""
    chunk = b"0123456789abcdef"
    return (chunk * (n // len(chunk) + 1))[:n]


def _check_loop(args: Args) -> None:
    loop = type(asyncio.get_running_loop())
    want_uvloop = args["loop"] == "uvloop"
    assert loop.__module__.startswith("uvloop") == want_uvloop, f"running on {loop!r}"


# -- HTTP -------------------------------------------------------------------------------


async def aiohttp_client(args: Args) -> None:
    """HTTP and HTTPS (verified), two requests each on one kept-alive connection."""
    import aiohttp

    http, https = args["http_port"], args["https_port"]
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    connector = aiohttp.TCPConnector(ssl=_context(args))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async with session.get(f"http://www.test:{http}/") as resp:
            assert resp.status == 200
            assert b"reached through tether" in await resp.read()
        async with session.get(f"http://www.test:{http}/bytes/100000") as resp:
            assert await resp.read() == _pattern(100_000)
        for n in (1, 300_000):
            async with session.get(f"https://www.test:{https}/bytes/{n}") as resp:
                assert resp.status == 200
                assert await resp.read() == _pattern(n)
    # Verification is really on: the system's CAs do not know the test CA.
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            await session.get(f"https://www.test:{https}/")
        except aiohttp.ClientConnectorCertificateError as exc:
            assert "CERTIFICATE_VERIFY_FAILED" in str(exc), exc
        else:
            raise AssertionError("an unknown CA was accepted")


async def httpx_client(args: Args) -> None:
    """httpx.AsyncClient: HTTP and HTTPS (verified), two requests each on one connection."""
    import httpx

    http, https = args["http_port"], args["https_port"]
    async with httpx.AsyncClient(verify=_context(args), timeout=TIMEOUT) as client:
        resp = await client.get(f"http://www.test:{http}/")
        assert resp.status_code == 200 and b"reached through tether" in resp.content
        resp = await client.get(f"http://www.test:{http}/bytes/100000")
        assert resp.content == _pattern(100_000)
        for n in (1, 300_000):
            resp = await client.get(f"https://www.test:{https}/bytes/{n}")
            assert resp.status_code == 200 and resp.content == _pattern(n)
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:  # the system's CAs
        try:
            await client.get(f"https://www.test:{https}/")
        except httpx.ConnectError as exc:
            assert "CERTIFICATE_VERIFY_FAILED" in str(exc), exc
        else:
            raise AssertionError("an unknown CA was accepted")


# -- databases and brokers --------------------------------------------------------------


async def redis_client(args: Args) -> None:
    """redis.asyncio: commands, a transaction, 2 MiB on one connection; pub/sub on another."""
    import redis.asyncio as redis

    prefix = args["prefix"]
    client = redis.Redis(host="localhost", port=args["redis_port"], socket_timeout=TIMEOUT,
                         socket_connect_timeout=TIMEOUT, single_connection_client=True)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        assert await client.set(f"{prefix}:key", b"through tether", ex=60)
        assert await client.get(f"{prefix}:key") == b"through tether"
        async with client.pipeline(transaction=True) as pipe:
            counter = f"{prefix}:counter"
            pipe.set(counter, 41, ex=60).incr(counter).get(counter)
            assert await pipe.execute() == [True, 42, b"42"]
        big = bytes(range(256)) * 8192  # 2 MiB: more than a socket buffer each way
        assert await client.set(f"{prefix}:big", big, ex=60)
        assert await client.get(f"{prefix}:big") == big

        channel = f"{prefix}:channel"
        await pubsub.subscribe(channel)
        while await client.publish(channel, b"hello subscribers") < 1:
            await asyncio.sleep(0.02)  # until the subscription is in place
        message = None
        while message is None:
            message = await pubsub.get_message(timeout=TIMEOUT)
        assert message["data"] == b"hello subscribers", message
    finally:
        await client.delete(f"{prefix}:key", f"{prefix}:counter", f"{prefix}:big")
        await pubsub.aclose()
        await client.aclose()


async def asyncpg_client(args: Args) -> None:
    import asyncpg

    table = args["prefix"]
    conn = await asyncpg.connect(host="127.0.0.1", port=args["postgres_port"], user="postgres",
                                 database="test", timeout=TIMEOUT)
    try:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text)")
        try:
            await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)",
                                   [(i, f"row {i}") for i in range(100)])
            rows = await conn.fetch(f"SELECT id, body FROM {table} WHERE id >= $1 ORDER BY id", 98)
            assert [tuple(r) for r in rows] == [(98, "row 98"), (99, "row 99")]
            big = "x" * 1_000_000
            assert await conn.fetchval("SELECT length($1::text)", big) == len(big)
        finally:
            await conn.execute(f"DROP TABLE {table}")
    finally:
        await conn.close()


async def aiomysql_client(args: Args) -> None:
    import aiomysql

    table = args["prefix"]
    conn = await aiomysql.connect(host="127.0.0.1", port=args["mysql_port"], user="root",
                                  password="", db="test", connect_timeout=TIMEOUT)
    try:
        async with conn.cursor() as cur:
            await cur.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, body TEXT)")
            try:
                await cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)",
                                      [(i, f"row {i}") for i in range(100)])
                await conn.commit()
                await cur.execute(f"SELECT id, body FROM {table} WHERE id >= %s ORDER BY id", 98)
                assert await cur.fetchall() == ((98, "row 98"), (99, "row 99"))
            finally:
                await cur.execute(f"DROP TABLE {table}")
    finally:
        conn.close()


async def aio_pika_client(args: Args) -> None:
    import aio_pika

    connection = await aio_pika.connect(
        host="localhost", port=args["amqp_port"], login="guest", password="guest", timeout=TIMEOUT
    )
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(args["prefix"], auto_delete=True)
        try:
            bodies = [f"message {i}".encode() for i in range(3)] + [b"z" * 500_000]
            for body in bodies:
                await channel.default_exchange.publish(
                    aio_pika.Message(body), routing_key=queue.name
                )
            got = []
            async with queue.iterator(timeout=TIMEOUT) as messages:
                async for message in messages:
                    async with message.process():
                        got.append(message.body)
                    if len(got) == len(bodies):
                        break
            assert got == bodies
        finally:
            await queue.delete(if_unused=False, if_empty=False)


async def nats_client(args: Args) -> None:
    import nats

    subject = args["prefix"]
    nc = await nats.connect(f"nats://localhost:{args['nats_port']}", connect_timeout=TIMEOUT,
                            allow_reconnect=False)
    try:
        sub = await nc.subscribe(subject)
        await nc.publish(subject, b"hello through tether")
        msg = await sub.next_msg(timeout=TIMEOUT)
        assert msg.data == b"hello through tether"

        async def reply(msg: Any) -> None:
            await msg.respond(msg.data[::-1])

        await nc.subscribe(f"{subject}.rpc", cb=reply)
        answer = await nc.request(f"{subject}.rpc", b"ping", timeout=TIMEOUT)
        assert answer.data == b"gnip"
    finally:
        await nc.close()


# -- mail -------------------------------------------------------------------------------


async def aiosmtplib_client(args: Args) -> None:
    """STARTTLS verified for mail.test, then a message the server records."""
    import aiosmtplib

    msg = EmailMessage()
    msg["From"] = "alice@mail.test"
    msg["To"] = "bob@mail.test"
    msg["Subject"] = args["prefix"]
    msg.set_content("through tether\n")
    smtp = aiosmtplib.SMTP(hostname="mail.test", port=args["smtp_port"],
                           local_hostname="client.test", start_tls=False,
                           tls_context=_context(args), timeout=TIMEOUT)
    async with smtp:
        await smtp.ehlo()
        assert smtp.supports_extension("starttls")
        code, _ = await smtp.starttls()
        assert code == 220
        ssl_object = smtp.transport.get_extra_info("ssl_object")
        assert ssl_object is not None and ssl_object.server_hostname == "mail.test"
        refused, _ = await smtp.send_message(msg)
        assert refused == {}


# -- anyio and trio: a raw HTTP exchange over a plain and a TLS stream -----------------


def _request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: www.test\r\nConnection: close\r\n\r\n".encode()


def _body(response: bytes) -> bytes:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return body


async def anyio_client(args: Args) -> None:
    import anyio

    for port, tls in ((args["http_port"], False), (args["https_port"], True)):
        # anyio does TLS whenever it is given a context, so only then; the
        # server closes without close_notify, as HTTPS servers may.
        tls_args: dict[str, Any] = (
            {"ssl_context": _context(args), "tls_hostname": "www.test",
             "tls_standard_compatible": False} if tls else {}
        )
        stream = await anyio.connect_tcp("www.test", port, **tls_args)
        async with stream:
            await stream.send(_request("/bytes/200000"))
            response = b""
            try:
                while True:
                    response += await stream.receive()
            except anyio.EndOfStream:
                pass
        assert _body(response) == _pattern(200_000)


async def trio_client(args: Args) -> None:
    import trio

    for port, tls in ((args["http_port"], False), (args["https_port"], True)):
        stream: Any = await trio.open_tcp_stream("www.test", port)
        if tls:
            # The server closes without close_notify, as HTTPS servers may.
            stream = trio.SSLStream(stream, _context(args), server_hostname="www.test",
                                    https_compatible=True)
        async with stream:
            await stream.send_all(_request("/bytes/200000"))
            response = b""
            while chunk := await stream.receive_some():
                response += chunk
        assert _body(response) == _pattern(200_000)


CLIENTS: dict[str, Callable[[Args], Awaitable[None]]] = {
    "aiohttp": aiohttp_client,
    "httpx": httpx_client,
    "redis": redis_client,
    "asyncpg": asyncpg_client,
    "aiomysql": aiomysql_client,
    "aio_pika": aio_pika_client,
    "nats": nats_client,
    "aiosmtplib": aiosmtplib_client,
    "anyio": anyio_client,
    "trio": trio_client,
}


def main() -> None:
    args: Args = json.loads(sys.argv[1])
    client = CLIENTS[args["library"]]

    async def checked() -> None:
        _check_loop(args)
        await asyncio.wait_for(client(args), TIMEOUT * 3)

    if args["loop"] == "trio":
        import trio

        async def bounded() -> None:
            with trio.fail_after(TIMEOUT * 3):
                await client(args)

        trio.run(bounded)
    elif args["library"] == "anyio":
        # anyio picks the loop itself: its own switch for uvloop.
        import anyio

        anyio.run(checked, backend="asyncio",
                  backend_options={"use_uvloop": args["loop"] == "uvloop"})
    elif args["loop"] == "uvloop":
        import uvloop

        uvloop.run(checked())
    else:
        asyncio.run(checked())
    print("ok")


if __name__ == "__main__":
    main()
