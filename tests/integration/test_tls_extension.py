"""The ASGI TLS extension added to uvicorn: the app sees exactly the verified client certificate,
and without it the API fails closed."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from exchange import crypto
from exchange.api.app import create_app
from exchange.api.tls import HEADER_OVERHEAD, MAX_HEAD_BYTES, TLSHttpToolsProtocol
from exchange.config import load_settings
from exchange.demo import free_port
from exchange.node import Node
from tests.support import PASSPHRASE, make_pair

seen: list[dict[str, Any]] = []


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    seen.append(scope.get("extensions", {}))
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = crypto.make_ca("test CA", "test", PASSPHRASE)
    files = {"ca": tmp_path / "ca.pem"}
    files["ca"].write_bytes(ca.cert_pem)
    for name in ("server", "client"):
        issued = crypto.issue_certificate(
            ca,
            PASSPHRASE,
            kind="server" if name == "server" else "client",
            common_name=f"test-{name}",
            organisation="test",
            passphrase=PASSPHRASE,
            ip_addresses=("127.0.0.1",),
        )
        (tmp_path / f"{name}.pem").write_bytes(issued.cert_pem)
        (tmp_path / f"{name}-key.pem").write_bytes(issued.key_pem)
        files[name], files[f"{name}-key"] = tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem"
    return files


@pytest.fixture
def server(pki: dict[str, Path]) -> Iterator[str]:
    yield from _serve(pki)


def _serve(pki: dict[str, Path], **settings: int) -> Iterator[str]:
    """The echo app under uvicorn with the TLS protocol; ``settings`` set on its configuration."""
    port = free_port()
    config = uvicorn.Config(
        echo_app,
        host="127.0.0.1",
        port=port,
        http=TLSHttpToolsProtocol,
        log_level="warning",
        ssl_certfile=str(pki["server"]),
        ssl_keyfile=str(pki["server-key"]),
        ssl_keyfile_password=PASSPHRASE,
        ssl_ca_certs=str(pki["ca"]),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
    )
    for name, value in settings.items():
        setattr(config, name, value)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"https://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def test_every_request_on_a_connection_carries_the_verified_client_certificate(
    server: str, pki: dict[str, Path]
) -> None:
    seen.clear()
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    ctx.load_cert_chain(str(pki["client"]), str(pki["client-key"]), password=PASSPHRASE)
    with httpx.Client(verify=ctx) as http:
        for _ in range(3):  # keep-alive: one connection, three requests
            assert http.get(server + "/").status_code == 204
    expected = crypto.certificate_info(pki["client"].read_bytes()).fingerprint
    assert len(seen) == 3
    for ext in seen:
        chain = ext["tls"]["client_cert_chain"]
        assert crypto.certificate_info(chain[0].encode()).fingerprint == expected
        assert ext["tls"]["tls_version"] in (0x0303, 0x0304)


def test_the_api_fails_closed_without_the_tls_extension(tmp_path: Path) -> None:
    id_dir, _ = make_pair(tmp_path)
    node = Node(load_settings(id_dir.path))
    app = create_app(node, run_worker=False)

    async def calls() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)  # no TLS: no extension in the scope
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
            return [
                await client.request(method, path, json={"envelopes": ["a"]})
                for method, path in (
                    ("GET", "/v1/inbox"),
                    ("GET", "/v1/messages/x"),
                    ("POST", "/v1/peer/envelopes"),
                )
            ]

    for response in asyncio.run(calls()):
        assert response.status_code == 403
        assert response.headers["content-type"] == "application/problem+json"
    node.close()


def test_a_request_head_over_the_bound_is_431_before_the_app_sees_it(
    server: str, pki: dict[str, Path]
) -> None:
    """uvicorn's httptools parser keeps appending a request's URL and headers; the protocol answers
    431 problem JSON past MAX_HEAD_BYTES (in one header, in many, or in the URL) and closes the
    connection, and the app never sees the request. A head just under the bound is served."""
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    ctx.load_cert_chain(str(pki["client"]), str(pki["client-key"]), password=PASSPHRASE)
    seen.clear()
    many = {f"x-h{i}": "v" for i in range(MAX_HEAD_BYTES // (HEADER_OVERHEAD + 6))}
    with httpx.Client(verify=ctx) as http:
        for headers in ({"x-big": "a" * (MAX_HEAD_BYTES + 1)}, many):
            r = http.get(server + "/", headers=headers)
            assert r.status_code == 431, r.text
            assert r.headers["content-type"] == "application/problem+json"
            assert r.headers["connection"] == "close"
            assert r.json()["status"] == 431
        # a URL longer than httpx sends: written on the socket
        host, port = server.removeprefix("https://").split(":")
        with (
            socket.create_connection((host, int(port))) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as conn,
        ):
            conn.sendall(b"GET /" + b"a" * (MAX_HEAD_BYTES + 1) + b" HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
        # one header that never ends: the parser buffers it whole before any callback sees it
        with (
            socket.create_connection((host, int(port))) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as conn,
        ):
            conn.settimeout(10)  # (without the bound the server reads on for ever: this fails, not hangs)
            conn.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nx-endless: ")
            answer = b""
            try:
                for _ in range(2 * MAX_HEAD_BYTES // 4096):
                    conn.sendall(b"a" * 4096)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass  # refused and closed meanwhile
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
        assert seen == []
        assert http.get(server + "/", headers={"x-big": "a" * (MAX_HEAD_BYTES - 4096)}).status_code == 204
    assert len(seen) == 1


def test_the_head_bound_is_the_node_s_setting(pki: dict[str, Path]) -> None:
    """``max_head_bytes`` (the node's settings, set on the uvicorn configuration by serve) bounds
    the head in place of the default."""
    served = _serve(pki, max_head_bytes=8192)
    url = next(served)
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    ctx.load_cert_chain(str(pki["client"]), str(pki["client-key"]), password=PASSPHRASE)
    try:
        with httpx.Client(verify=ctx) as http:
            assert http.get(url + "/", headers={"x-big": "a" * 4096}).status_code == 204
            refused = http.get(url + "/", headers={"x-big": "a" * 9000})
            assert refused.status_code == 431
            assert "8192" in refused.json()["detail"]
    finally:
        next(served, None)
