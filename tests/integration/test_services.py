"""Real database and broker clients through a real gateway, against this machine's services.

Each test drives an unmodified client library (redis-py, PyMySQL, pg8000,
pika, paho-mqtt) after `tether.install()` and checks that its socket really
is a tether socket whose fd is the hop to the gateway, and that the gateway
logged the decision for the service's port. The services live on loopback
only; a test skips when its service is not running, and fails instead when
TETHER_REQUIRE_SERVICES=1 (as in CI).
Every key, table, queue and topic name is unique to the run and removed.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pg8000.native
import pika
import pika.compat
import pymysql
import pytest
import redis
from support import Gateway, require_service
from tcpservers import StdSocket, wait_for

from tether.client.sock import socket as TetherSocket

pytestmark = pytest.mark.services

T = TypeVar("T")

TIMEOUT = 10.0
REDIS, MYSQL, POSTGRES, AMQP, MQTT = 6379, 3306, 5432, 5672, 1883


def _require(port: int, name: str) -> None:
    require_service(port, name)


@pytest.fixture
def unique() -> str:
    return f"tether_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"


def _gateway_addr(gateway: Gateway) -> tuple[str, int]:
    host, _, port = gateway.address.rpartition(":")
    return host.strip("[]"), int(port)


def _assert_through_tether(sock: Any, gateway: Gateway, port: int) -> None:
    """The library's socket is tether's, reports the service, and rides the gateway hop."""
    assert isinstance(sock, TetherSocket), f"{type(sock)!r} is not a tether socket"
    assert sock.getpeername() == ("127.0.0.1", port)
    assert StdSocket.getpeername(sock) == _gateway_addr(gateway)
    # The gateway decided (and logged) this connection.
    assert wait_for(lambda: _decided(gateway, port)), f"no audit decision for port {port}"


def _decided(gateway: Gateway, port: int) -> bool:
    for line in gateway.log_text().splitlines():
        if '"event":"decision"' in line:
            record = json.loads(line[line.index("{"):])
            if record["port"] == port and record["verdict"] == "allow":
                return True
    return False


def _call_quietly(fn: Callable[[], T]) -> T:
    """fn(), with an OSError turned into a plain test failure after what it leaked is freed.

    When a library dies half-way through making a socket pair, its half-made
    sockets live on in the traceback; freed later under the suite's
    warnings-as-errors they would raise a ResourceWarning in some other test.
    Handling the exception here frees them at once, quietly.
    """
    failure = ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            return fn()
        except OSError as exc:
            failure = f"{type(exc).__name__}: {exc}"
        gc.collect()
    pytest.fail(failure)




# -- Redis ------------------------------------------------------------------------------------


def test_redis_set_get_pipeline_pubsub(tethered: Gateway, unique: str) -> None:
    _require(REDIS, "Redis")
    # "localhost" is resolved by the gateway's static table, not here.
    client = redis.Redis(host="localhost", port=REDIS, socket_timeout=TIMEOUT,
                         socket_connect_timeout=TIMEOUT, single_connection_client=True,
                         socket_keepalive=True,
                         socket_keepalive_options={socket.TCP_KEEPIDLE: 45})
    try:
        key = f"{unique}:key"
        assert client.set(key, b"through tether", ex=60)
        assert client.get(key) == b"through tether"
        sock = client.connection._sock
        _assert_through_tether(sock, tethered, REDIS)
        # redis-py's pre-connect options reached the gateway's outbound socket.
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 45

        pipe = client.pipeline(transaction=True)
        try:
            counter = f"{unique}:counter"
            pipe.set(counter, 41, ex=60).incr(counter).get(counter).delete(counter)
            assert pipe.execute() == [True, 42, b"42", 1]
        finally:
            pipe.reset()

        big = os.urandom(2 * 1024 * 1024)  # more than one socket buffer each way
        assert client.set(f"{unique}:big", big, ex=60)
        assert client.get(f"{unique}:big") == big

        channel = f"{unique}:channel"
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(channel)
            # The subscription is confirmed asynchronously: publish until heard.
            assert wait_for(lambda: client.publish(channel, b"warm-up") >= 1, TIMEOUT, 0.05)
            _assert_through_tether(pubsub.connection._sock, tethered, REDIS)
            assert client.publish(channel, b"hello subscribers") == 1
            got: list[bytes] = []
            deadline = time.monotonic() + TIMEOUT
            while b"hello subscribers" not in got and time.monotonic() < deadline:
                message = pubsub.get_message(timeout=0.5)
                if message is not None:
                    got.append(message["data"])
            assert b"hello subscribers" in got
            pubsub.unsubscribe(channel)
        finally:
            pubsub.close()
        assert client.delete(key, f"{unique}:big") == 2
    finally:
        client.close()


def test_redis_with_default_keepalive_options(tethered: Gateway, unique: str) -> None:
    _require(REDIS, "Redis")
    client = redis.Redis(host="localhost", port=REDIS, socket_timeout=TIMEOUT,
                         socket_connect_timeout=TIMEOUT, single_connection_client=True)
    try:
        assert client.set(f"{unique}:default", b"1", ex=60)
        assert client.get(f"{unique}:default") == b"1"
        assert client.delete(f"{unique}:default") == 1
    finally:
        client.close()


# -- MariaDB / MySQL --------------------------------------------------------------------------


def test_pymysql_temp_table_and_version(tethered: Gateway, unique: str) -> None:
    _require(MYSQL, "MariaDB")
    conn = pymysql.connect(host="127.0.0.1", port=MYSQL, user="root", password="",
                           database="test", connect_timeout=TIMEOUT, read_timeout=TIMEOUT,
                           write_timeout=TIMEOUT)
    try:
        _assert_through_tether(conn._sock, tethered, MYSQL)
        with conn.cursor() as cur:
            cur.execute("SELECT @@version")
            (version,) = cur.fetchone()
            assert isinstance(version, str)
            assert version
            table = unique
            cur.execute(f"CREATE TEMPORARY TABLE {table} "
                        "(id INT PRIMARY KEY, name VARCHAR(64), payload LONGBLOB)")
            blob = os.urandom(256 * 1024)
            rows = [(i, f"row {i}", blob if i == 0 else b"") for i in range(100)]
            cur.executemany(f"INSERT INTO {table} (id, name, payload) VALUES (%s, %s, %s)",
                            rows)
            cur.execute(f"SELECT COUNT(*), SUM(id) FROM {table}")
            assert cur.fetchone() == (100, sum(range(100)))
            cur.execute(f"SELECT name, payload FROM {table} WHERE id = %s", (0,))
            assert cur.fetchone() == ("row 0", blob)
            cur.execute(f"DROP TEMPORARY TABLE {table}")
        conn.commit()
        # PyMySQL switches keep-alive on right after connecting: it reached the
        # gateway's outbound socket.
        assert conn._sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    finally:
        conn.close()


# -- PostgreSQL -----------------------------------------------------------------------------


def test_pg8000_query_and_1_mib_bytea(tethered: Gateway, unique: str) -> None:
    _require(POSTGRES, "PostgreSQL")
    # Trust authentication: user "postgres" needs no password here.
    conn = pg8000.native.Connection(user="postgres", host="127.0.0.1", port=POSTGRES,
                                    database="test", timeout=TIMEOUT)
    try:
        _assert_through_tether(conn._usock, tethered, POSTGRES)
        assert conn.run("SELECT current_database(), 1 + 1") == [["test", 2]]
        data = os.urandom(1024 * 1024)
        ((echoed, length, digest),) = conn.run(
            "SELECT CAST(:b AS bytea), length(CAST(:b AS bytea)), "
            "encode(sha256(CAST(:b AS bytea)), 'hex')",
            b=data,
        )
        assert length == len(data)
        assert digest == hashlib.sha256(data).hexdigest()  # the server got it intact
        assert echoed == data  # and so did we, on the way back
        conn.run(f"CREATE TEMPORARY TABLE {unique} (id int, payload bytea)")
        conn.run(f"INSERT INTO {unique} VALUES (1, :p)", p=data)
        assert conn.run(f"SELECT payload FROM {unique} WHERE id = 1") == [[data]]
        conn.run(f"DROP TABLE {unique}")
    finally:
        conn.close()


# -- RabbitMQ -------------------------------------------------------------------------------


def _amqp_round_trip(gateway: Gateway, queue: str) -> None:
    params = pika.ConnectionParameters(
        host="localhost", port=AMQP, credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=1, socket_timeout=TIMEOUT, stack_timeout=TIMEOUT * 2,
        blocked_connection_timeout=TIMEOUT,
    )
    conn = _call_quietly(lambda: pika.BlockingConnection(params))
    try:
        _assert_through_tether(conn._impl._transport._sock, gateway, AMQP)
        channel = conn.channel()
        declared = channel.queue_declare(queue=queue, exclusive=True, auto_delete=True)
        assert declared.method.queue == queue
        body = f"hello {queue}".encode() + os.urandom(64 * 1024)
        channel.basic_publish(exchange="", routing_key=queue, body=body,
                              properties=pika.BasicProperties(content_type="application/x"))
        got = None
        deadline = time.monotonic() + TIMEOUT
        while got is None and time.monotonic() < deadline:
            method, props, payload = channel.basic_get(queue=queue, auto_ack=True)
            if method is None:
                conn.sleep(0.05)
                continue
            got = (props.content_type, payload)
        assert got == ("application/x", body)
        channel.queue_delete(queue=queue)
        channel.close()
    finally:
        if conn.is_open:
            conn.close()


def test_pika_unmodified_blocking_connection(tethered: Gateway, unique: str) -> None:
    _require(AMQP, "RabbitMQ")
    _amqp_round_trip(tethered, unique)


# -- Mosquitto ------------------------------------------------------------------------------


def _mqtt_round_trip(gateway: Gateway, topic: str) -> None:
    connected, subscribed, received = threading.Event(), threading.Event(), threading.Event()
    messages: list[tuple[str, bytes, int]] = []

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                   props: Any) -> None:
        if not reason.is_failure:
            connected.set()

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                     props: Any) -> None:
        subscribed.set()

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        messages.append((message.topic, message.payload, message.qos))
        received.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=topic.replace("/", "-"))
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    assert client.connect("127.0.0.1", MQTT, keepalive=30) == mqtt.MQTT_ERR_SUCCESS
    try:
        _call_quietly(client.loop_start)
        try:
            assert connected.wait(TIMEOUT)
            _assert_through_tether(client.socket(), gateway, MQTT)
            result, _ = client.subscribe(topic, qos=1)
            assert result == mqtt.MQTT_ERR_SUCCESS
            assert subscribed.wait(TIMEOUT)
            info = client.publish(topic, b"through tether", qos=1)
            info.wait_for_publish(TIMEOUT)
            assert info.is_published()
            assert received.wait(TIMEOUT)
            assert messages[0] == (topic, b"through tether", 1)
            client.unsubscribe(topic)
            client.disconnect()
        finally:
            client.loop_stop()
    finally:
        sock = client.socket()
        if sock is not None:  # disconnect() leaves closing to the loop
            sock.close()


def test_paho_mqtt_unmodified_loop_start(tethered: Gateway, unique: str) -> None:
    _require(MQTT, "Mosquitto")
    _mqtt_round_trip(tethered, f"tether/test/{unique}")
