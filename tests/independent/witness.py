"""A minimal C2SP tlog-witness (https://c2sp.org/tlog-witness), written from the spec with
``tests.independent.tlog``: an HTTP server answering ``POST <prefix>/add-checkpoint``."""

from __future__ import annotations

import base64
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.independent import tlog


class MiniWitness:
    """Cosigns the checkpoints of the logs it is configured with (origin -> vkey)."""

    def __init__(self, name: str, logs: list[str]) -> None:
        self.name = name
        self.key = Ed25519PrivateKey.generate()
        self.vkey = tlog.make_vkey(name, 0x04, self.key)
        self.logs = {v.name: v for v in map(tlog.parse_vkey, logs)}
        self.latest: dict[str, tuple[int, bytes]] = {}
        self.answers: list[int] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/w"

    def __enter__(self) -> MiniWitness:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_checkpoint(self, body: bytes) -> tuple[int, str, str]:
        """(status, content type, body) for an add-checkpoint request body."""
        try:
            head, note = body.decode().split("\n\n", 1)
            lines = head.split("\n")
            if not lines[0].startswith("old "):
                return 400, "text/plain", "no old size\n"
            old = int(lines[0][4:])
            consistency = [base64.b64decode(x, validate=True) for x in lines[1:]]
            text, _ = tlog.note_parts(note)
            origin, size, root, _ext = tlog.parse_checkpoint(text)
        except (ValueError, tlog.Invalid):
            return 400, "text/plain", "malformed\n"
        if origin not in self.logs:
            return 404, "text/plain", "unknown log\n"
        try:
            tlog.open_note(note, [self.logs[origin]])
        except tlog.Invalid:
            return 403, "text/plain", "no valid log signature\n"
        if old > size:
            return 400, "text/plain", "old size beyond the checkpoint\n"
        with self._lock:  # check and update atomically
            held_size, held_root = self.latest.get(origin, (0, b""))
            if old != held_size:
                return 409, "text/x.tlog.size", f"{held_size}\n"
            if old == 0:
                if consistency:
                    return 400, "text/plain", "a proof from size 0\n"
            elif old == size:
                if root != held_root:
                    return 409, "text/x.tlog.size", f"{held_size}\n"
            else:
                try:
                    tlog.check_consistency(old, size, consistency, held_root, root)
                except tlog.Invalid:
                    return 422, "text/plain", "inconsistent\n"
            self.latest[origin] = (size, root)
            self.answers.append(size)
        return 200, "text/plain", tlog.sign_line(self.name, 0x04, self.key, text, int(time.time())) + "\n"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        witness = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                if self.path != "/w/add-checkpoint":
                    status, kind, text = 404, "text/plain", "no such endpoint\n"
                else:
                    status, kind, text = witness.add_checkpoint(body)
                data = text.encode()
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
