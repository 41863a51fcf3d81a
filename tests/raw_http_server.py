"""A small HTTP/1.1 server on loopback that counts connections and misbehaves on request.

For transport tests that need what uvicorn will not do on purpose: close a kept-alive
connection when the next request arrives on it (the race of a server's idle timeout),
send a body slowly, hold a request until released, and record each TLS connection's client
certificate. A real server on a real socket (optionally real TLS), run on threads.

Paths:
  GET /            -> 200 "ok", keep-alive
  ANY /once        -> 200 "ok"; the next request on that connection is read, then the
                      connection is closed without an answer
  GET /slow-body   -> 200 with 50 chunks of 1 KiB, 20 ms apart
  GET /hold        -> answers once ``release`` is set
  GET /big         -> 200 with a 4 MiB body (``BIG``), sent as fast as the client reads
  GET /bye         -> 200 "ok" (keep-alive by its headers), then the server closes the
                      connection at once: an idle connection the server has closed
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from typing import Any

#: /big's body: 4 MiB, no two neighbouring KiB alike, so a lost or repeated piece shows
BIG = b"".join(index.to_bytes(4, "big") * 256 for index in range(4096))


class RawServer:
    """``with RawServer() as server: ... server.url``; counts accepted connections."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.connections = 0
        #: each TLS connection's client certificate serial number (None without one)
        self.client_serials: list[int | None] = []
        self.release = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []

    def __enter__(self) -> RawServer:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self.release.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            with self._lock:
                self.connections += 1
                self._sockets.append(sock)
                self._threads.append(thread)
            thread.start()

    def _serve(self, raw: socket.socket) -> None:
        sock: Any = raw
        try:
            if self._tls is not None:
                sock = self._tls.wrap_socket(raw, server_side=True)
                der = sock.getpeercert(binary_form=True)
                serial = _serial(der) if der else None
                with self._lock:
                    self.client_serials.append(serial)
                    self._sockets.append(sock)
            reader = sock.makefile("rb")
            close_next = False
            while not self._stop.is_set():
                head = _read_head(reader)
                if head is None:
                    return
                _method, path, length = head
                if length:
                    reader.read(length)
                if close_next:
                    return  # the request was read: hang up without an answer
                if path == "/slow-body":
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 51200\r\n\r\n")
                    for _ in range(50):
                        sock.sendall(b"x" * 1024)
                        time.sleep(0.02)
                    continue
                if path == "/big":
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG))
                    sock.sendall(BIG)
                    continue
                if path == "/bye":
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    return
                if path == "/hold":
                    self.release.wait(30)
                close_next = path == "/once"
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (OSError, ssl.SSLError, ValueError):
            return
        finally:
            sock.close()


def _read_head(reader: Any) -> tuple[str, str, int] | None:
    line = reader.readline()
    if not line:
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    length = 0
    while True:
        header = reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return method, path, length


def _serial(der: bytes) -> int:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number
