"""Certificates replaced on disk reach a running node without a restart.

A :class:`ReloadingContext` owns one ``ssl.SSLContext`` built from files and rebuilds it when any
of those files changes. A change is a new identity (inode, size, modification time) of a watched
file, checked on use at most once every ``interval`` seconds, so each process of a node (every
``serve`` worker) notices it by itself, with no coordination; a writer that renames a complete file
into place (``exchange.files.write_private``) changes the inode every time.

Guarantees:

- A rebuilt context is complete (certificate, key and trust bundle loaded and hardened) before it
  is used; until files load cleanly (a certificate and a key written one after the other, a wrong
  passphrase) the previous context stays in use and the failure is logged, without key material,
  and retried at the next check.
- The server (:meth:`ReloadingContext.install_on_server`): the context uvicorn listens with gets an
  ``sni_callback``, which OpenSSL calls on every ClientHello (with or without SNI); when the files
  have changed, the handshake switches to the rebuilt context, so every new TLS connection presents
  the new certificate and is verified against the new trust bundle. Connections already open keep
  the certificate they were made with.
- The partner link: :class:`exchange.transport.peer.HttpsPeerTransport` takes
  :meth:`ReloadingContext.current` and opens a new connection pool when the context changes.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from uvicorn.config import Config

from exchange import tls_policy
from exchange.errors import ExchangeError

log = logging.getLogger("exchange.tls")

FileIdentity = tuple[tuple[int, int, int] | None, ...]


def file_identity(paths: Sequence[Path]) -> FileIdentity:
    """(inode, size, mtime in ns) of each path, None for a missing one: equal only if no file changed."""
    out: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class ReloadingContext:
    """An SSL context built by ``build`` from ``paths``, rebuilt when one of them changes."""

    def __init__(
        self,
        build: Callable[[], ssl.SSLContext],
        paths: Sequence[Path],
        interval: float,
        *,
        name: str,
        initial: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Build the first context now (or adopt ``initial``, built from the same files).

        Raises:
            ssl.SSLError, OSError: the files cannot be loaded (at start, this is fatal).
        """
        self.name = name
        self._build = build
        self._paths = tuple(paths)
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._identity = file_identity(self._paths)
        self._context = initial if initial is not None else build()
        self._next_check = clock() + interval
        self.reloads = 0  # how many times the files were reloaded (for tests and logs)

    def current(self) -> ssl.SSLContext:
        """The context for a new connection: rebuilt first if a file changed since the last check
        (checked at most once per interval). Never raises: a failed rebuild keeps the old context."""
        now = self._clock()
        if now < self._next_check:
            return self._context
        with self._lock:
            if now < self._next_check:
                return self._context
            self._next_check = now + self._interval
            identity = file_identity(self._paths)
            if identity == self._identity:
                return self._context
            try:
                context = self._build()
            except (OSError, ValueError, ExchangeError) as exc:  # ssl.SSLError is an OSError
                log.warning(
                    "TLS files of the %s changed but do not load (%s); still using the previous"
                    " certificate, retrying in %.0f s",
                    self.name,
                    type(exc).__name__,
                    self._interval,
                )
                return self._context
            self._identity = identity
            self._context = context
            self.reloads += 1
        log.info("reloaded the %s certificate from %s", self.name, self._paths[0])
        return context

    def install_on_server(self, listening: ssl.SSLContext) -> None:
        """Make the server context ``listening`` hand each new handshake to :meth:`current`."""

        def on_client_hello(ssl_object: ssl.SSLObject, _server_name: str | None, ctx: ssl.SSLContext) -> None:
            context = self.current()
            if context is not ctx:
                ssl_object.context = context

        listening.sni_callback = on_client_hello


class ServerContextFactory:
    """uvicorn's ``ssl_context_factory``: the server context as uvicorn makes it, hardened
    (``exchange.tls_policy``), that reloads its certificate, key and trust bundle. uvicorn calls it in
    every process that serves (picklable, for worker processes)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval

    def __call__(self, config: Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        def build() -> ssl.SSLContext:
            return tls_policy.harden(default())

        listening = build()
        files = (config.ssl_certfile, config.ssl_keyfile, config.ssl_ca_certs)
        paths = [Path(os.fspath(p)) for p in files if p]
        ReloadingContext(build, paths, self.interval, name="server", initial=listening).install_on_server(
            listening
        )
        return listening
