"""The readers' HTTP client against a real server on 127.0.0.1 that drops a kept-alive
connection under the next request, as a server whose idle timeout fires at that moment does."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from sync_pipelines.engine.http_reads import read_client

BODY = b'{"ok": true}'
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
          b"Connection: keep-alive\r\n\r\n%s" % (len(BODY), BODY))


class DroppingServer:
    """Answers the first request of each connection and closes it when the second arrives,
    without answering it; counts connections and requests."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                for answered in (True, False):
                    head = self._read_request(conn)
                    if head is None:
                        break
                    self.requests.append(head.split(b"\r\n", 1)[0])
                    if answered:
                        conn.sendall(ANSWER)

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[DroppingServer]:
    s = DroppingServer()
    yield s
    s.close()


def test_a_get_on_a_dropped_connection_is_sent_again_on_a_new_one(server):
    with read_client(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as client:
        assert client.get("/contacts/1").json() == {"ok": True}
        # The kept-alive connection is reused and dropped under this request.
        assert client.get("/contacts/2").json() == {"ok": True}
    assert server.requests == [b"GET /contacts/1 HTTP/1.1", b"GET /contacts/2 HTTP/1.1",
                               b"GET /contacts/2 HTTP/1.1"]
    assert server.connections == 2


def test_a_write_on_a_dropped_connection_is_not_sent_twice(server):
    with read_client(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as client:
        client.get("/contacts/1")
        # The server closes with the body unread: a reset or a closed connection.
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            client.post("/contacts", json={"id": 2})
    assert server.requests == [b"GET /contacts/1 HTTP/1.1", b"POST /contacts HTTP/1.1"]
