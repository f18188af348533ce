"""Outside tcpserver (systemd Accept=yes sockets, inetd): the client's address comes
from REMOTE_ADDR/REMOTE_PORT or from the socket on fd 0 itself."""

import socket
import subprocess

from helpers import SERVER, EnvQueue, norm, require_server, server_env

SESSION = (b"MAIL FROM:<a@b.c>\r\nRCPT TO:<u@example.com>\r\nDATA\r\nSubject: t\r\n\r\nhi\r\n"
           b".\r\nQUIT\r\n")


def serve_on_socket(home, env):
    """Run the server with an accepted TCP connection as fd 0 and 1 (inetd style);
    returns (what the client read, the client's own address, the server's address)."""
    require_server()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        with conn:
            proc = subprocess.Popen([SERVER], stdin=conn, stdout=conn,
                                    stderr=subprocess.DEVNULL, env=env)
    with client:
        client.sendall(SESSION)
        out = b""
        while chunk := client.recv(65536):
            out += chunk
        assert proc.wait(30) == 0
        return out, client.getsockname(), client.getpeername()


def without_tcp_vars(home, queue):
    env = server_env(home, {"QMAILQUEUE": queue.path})
    for name in ("TCPREMOTEIP", "TCPLOCALIP", "TCPREMOTEPORT", "TCPLOCALPORT"):
        env.pop(name, None)
    return env


def test_peer_taken_from_the_socket_on_fd_0(make_home):
    home = make_home()
    queue = EnvQueue(home)
    out, (client_ip, client_port), (server_ip, server_port) = serve_on_socket(
        home, without_tcp_vars(home, queue))
    assert norm(out).endswith(b"250 ok <TIME> qp <PID>\r\n221 mx.example.org\r\n")
    env = queue.environ()
    assert env[b"TCPREMOTEIP"] == client_ip.encode()
    assert env[b"TCPREMOTEPORT"] == b"%d" % client_port
    assert env[b"TCPLOCALIP"] == server_ip.encode()
    assert env[b"TCPLOCALPORT"] == b"%d" % server_port
    assert home.queued()[0].message.startswith(b"Received: from unknown (127.0.0.1)\n")


def test_systemd_remote_addr_is_used(make_home):
    home = make_home()
    queue = EnvQueue(home)
    env = without_tcp_vars(home, queue)
    env.update(REMOTE_ADDR="::ffff:192.0.2.7", REMOTE_PORT="40000")
    out, _, _ = serve_on_socket(home, env)
    assert b"\r\n250 ok " in out
    assert queue.environ()[b"TCPREMOTEIP"] == b"192.0.2.7"
    assert queue.environ()[b"TCPREMOTEPORT"] == b"40000"
    assert home.queued()[0].message.startswith(b"Received: from unknown (192.0.2.7)\n")


def test_on_pipes_without_tcp_variables_the_client_stays_unknown(make_home):
    from helpers import run_smtp
    home = make_home()
    r = run_smtp(SESSION, home=home, env={"TCPREMOTEIP": None})
    assert r.queued[0].message.startswith(b"Received: from unknown (unknown)\n")
