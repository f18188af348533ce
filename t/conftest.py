"""pytest fixtures shared by every test module; the machinery lives in helpers.py."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import helpers  # noqa: E402


@pytest.fixture
def make_home(tmp_path):
    """Factory: make_home(control={...}, defaults=True, queue_exit=0, queue_errtext=None,
    queue_signal=None) -> helpers.Home under this test's tmp_path."""
    count = 0

    def make(**kw):
        nonlocal count
        count += 1
        return helpers.Home(str(tmp_path / ("qmail%d" % count)), **kw)

    return make


@pytest.fixture
def home(make_home):
    """The default qmail home: me=mx.example.org, rcpthosts example.com and
    .sub.example.net, an empty smtpplugins, a fake queue exiting 0."""
    return make_home()


@pytest.fixture
def smtp(home):
    """smtp(input, env=None, **kw): run_smtp against the default home."""

    def run(input_bytes, env=None, **kw):
        return helpers.run_smtp(input_bytes, env=env, home=home, **kw)

    return run


@pytest.fixture
def tcpservers(tmp_path):
    """helpers.TcpServers for this test: start(home=None, env=None, rules=None,
    envdir=None, cwd=None, args=(), mode=None, maxconn=10, local_name="mx.test")
    -> TcpServer(port, log, proc, mode); tcpserver unless mode="pool"; all killed
    at teardown."""
    servers = helpers.TcpServers(tmp_path)
    try:
        yield servers
    finally:
        servers.stop_all()


@pytest.fixture(params=helpers.LAUNCHERS)
def launcher(request):
    """Each network launcher in turn: "tcpserver", then "pool" (`qmail-smtpd-py
    serve`)."""
    return request.param


@pytest.fixture
def servers(tmp_path, launcher):
    """Like tcpservers, but start() uses the launcher of this parametrization: a test
    taking `servers` runs once under tcpserver and once under `qmail-smtpd-py serve`."""
    started = helpers.TcpServers(tmp_path, mode=launcher)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real redis-server (redisserver.RedisServer) on loopback for the whole run,
    killed at the end; skipped (failed under CI) without redis-server."""
    from redisserver import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def fresh_redis(redis_server):
    """The shared redis_server, emptied (FLUSHALL) for this test."""
    client = redis_server.client()
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, which the test may stop and start again;
    killed at teardown."""
    from redisserver import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
