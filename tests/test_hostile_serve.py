"""Issue 24, the HTTP service under a hostile client: each test names the item it covers.

12: values JSON text may carry but a JSON answer cannot (NaN, Infinity, 1e999) get a 422, not a 500.
13: non-finite settings are refused; a body trickled slowly gets 408; SIGTERM ends the server within
    seconds whatever its clients do (a real `serve` process on 127.0.0.1).
16: /docs and /redoc render offline (scripts served locally); HEAD is answered like GET; a request
    with both Content-Length and Transfer-Encoding is refused.
Servers bind 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import ROOT, live_server

from agnews_lora.cli import main
from agnews_lora.errors import ConfigError
from agnews_lora.predict import Classifier
from agnews_lora import serve as serve_mod
from agnews_lora.serve import (SHUTDOWN_GRACE_S, BodySizeLimit, Limits, MicroBatcher, check_body_timeout,
                               create_app, serve)


@pytest.fixture(scope="module")
def clf(tiny_run) -> Classifier:
    return Classifier.load(tiny_run, precision="fp32")


@pytest.fixture(scope="module")
def client(clf):
    with TestClient(create_app(clf, max_wait_ms=1)) as c:
        yield c


def _post_raw(client, body: str):
    return client.post("/predict", content=body, headers={"content-type": "application/json"})


def _raw_request(url: str, request: bytes) -> bytes:
    """Send `request` bytes to the server at `url`; return all it answers until it closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        return _read_to_end(sock)


def _read_to_end(sock: socket.socket, first: bytes = b"") -> bytes:
    sock.settimeout(10)
    data, chunk = first, b"-"
    while chunk:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # the server closed with bytes of ours unread
            break
        data += chunk
    return data


# 12: non-finite numbers (and other values JSON cannot carry back) in a request

@pytest.mark.parametrize("body,shown", [
    ('{"texts": [NaN]}', "NaN"), ('{"texts": [Infinity]}', "Infinity"), ('{"texts": [-Infinity]}', "-Infinity"),
    ('{"texts": [1e999]}', "Infinity"), ('{"texts": ["ok", NaN]}', "NaN"), ('{"texts": [[NaN, 1]]}', "[NaN, 1]"),
    ('{"texts": [{"a": NaN}]}', '{"a": NaN}'),
])
def test_12_a_non_finite_text_gets_422_naming_it(client, body, shown):
    r = _post_raw(client, body)
    assert r.status_code == 422, r.text
    error = r.json()["detail"][0]
    assert error["input"] == shown and error["loc"][:2] == ["body", "texts"]
    assert f"is {shown}, not a string" in error["msg"]
    assert client.get("/health").json()["model_calls"] == 0


@pytest.mark.parametrize("body,loc", [
    ('{"texts": NaN}', ["body", "texts"]), ('{"texts": 1e999}', ["body", "texts"]),
    ('{"texts": ["a"], "extra": Infinity}', ["body", "extra"]), ('NaN', ["body"]),
    ('{"texts": "\\ud800"}', ["body", "texts"]),  # a lone surrogate: not UTF-8 encodable either
])
def test_12_every_validation_error_is_encodable(client, body, loc):
    r = _post_raw(client, body)
    assert r.status_code == 422, r.text
    error = r.json()["detail"][0]
    assert error["loc"] == loc and isinstance(error["input"], str)
    json.loads(r.content, parse_constant=lambda name: pytest.fail(f"the answer holds {name}"))


def test_12_a_lone_surrogate_key_gets_422(client):
    r = _post_raw(client, '{"texts": ["a"], "\\ud800": 1}')
    assert r.status_code == 422 and r.content.isascii()


def test_12_echoed_values_are_short(client):
    r = _post_raw(client, json.dumps({"texts": [["x" * 5000]], "extra": "y" * 5000}))
    assert r.status_code == 422 and len(r.content) < 2000


# 13: non-finite settings; slow bodies; shutdown

@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "inf", "1e999"])
def test_13_max_wait_ms_must_be_finite(clf, value):
    with pytest.raises(ConfigError, match="max_wait_ms.*not a finite number"):
        MicroBatcher(lambda t: t, max_wait_ms=value)
    with pytest.raises(ConfigError, match="max_wait_ms"):
        create_app(clf, max_wait_ms=value)


def test_13_serve_refuses_before_loading_the_model(tmp_path):
    # The folder does not exist: the setting must be refused first, by its library name.
    with pytest.raises(ConfigError, match="max_wait_ms.*not a finite number") as err:
        serve(str(tmp_path / "absent"), max_wait_ms=math.inf)
    assert "--" not in str(err.value)
    with pytest.raises(ConfigError, match="body_timeout_s"):
        serve(str(tmp_path / "absent"), body_timeout_s=math.nan)


def test_13_the_cli_refuses_an_infinite_wait(tiny_run, monkeypatch, capsys):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("serve started with an infinite wait"))
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(tiny_run), "--max-wait-ms", "inf"])
    assert exit_.value.code == 2 and re.search(r"max.wait.ms", capsys.readouterr().err)


@pytest.mark.parametrize("value", [math.nan, math.inf, 0, -1.0])
def test_13_body_timeout_must_be_finite_and_positive(value):
    with pytest.raises(ConfigError, match="body_timeout_s"):
        check_body_timeout(value)
    with pytest.raises(ConfigError, match="body_timeout_s"):
        BodySizeLimit(None, max_bytes=10, timeout_s=value)


@pytest.mark.parametrize("key,value", [("max_texts", math.inf), ("max_chars", math.nan), ("max_body_bytes", 2.5),
                                       ("max_texts", True)])
def test_13_limits_are_whole_numbers(key, value):
    with pytest.raises(ConfigError, match=f"Limits.{key}="):
        Limits(**{key: value})


def test_13_a_trickled_body_gets_408_in_time(clf):
    app = create_app(clf, body_timeout_s=0.5)
    with live_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{")
            start, answer = time.monotonic(), b""
            sock.settimeout(0.1)
            while not answer and time.monotonic() - start < 8:  # one byte every 0.1 s: each read is quick
                try:
                    sock.sendall(b" ")
                    answer = sock.recv(4096)
                except socket.timeout:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
            elapsed = time.monotonic() - start
            answer = _read_to_end(sock, answer)  # the server closes the connection after a 408
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"did not arrive within 0.5 s" in answer and b"connection: close" in answer.lower()
        assert elapsed < 4
        assert httpx.get(f"{url}/health", timeout=10).json()["requests"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_13_sigterm_stops_serve_within_seconds_whatever_clients_do(tiny_run, tmp_path):
    """A real `serve` process; a client trickles a body (one byte every 0.2 s, for ever), another
    holds an idle connection; after SIGTERM the process must exit within the grace period."""
    port = _free_port()
    code = (f"from agnews_lora.serve import serve; serve({str(tiny_run)!r}, host='127.0.0.1', port={port}, "
            "precision='fp32')")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    stop, sockets = threading.Event(), []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
        sockets += [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        slow = sockets[1]  # sockets[0] stays idle
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{")

        def trickle():
            while not stop.wait(0.2):
                try:
                    slow.sendall(b" ")
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(1)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=SHUTDOWN_GRACE_S + 15)
        except subprocess.TimeoutExpired:
            pytest.fail("serve still runs 15 s past its grace period after SIGTERM")
        elapsed = time.monotonic() - start
        assert elapsed < SHUTDOWN_GRACE_S + 5, elapsed
        assert proc.returncode in (0, -signal.SIGTERM)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        for sock in sockets:
            sock.close()


# 16: API docs offline; HEAD; Content-Length with Transfer-Encoding

def _local_assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_16_api_docs_load_every_asset_from_the_service(client, page):
    assert serve_mod.docs_assets() is not None, (
        "fastapi-offline (the serve extra) is not installed: pip install -e '.[serve]'")
    r = client.get(page)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "http://" not in r.text and "https://" not in r.text and "cdn" not in r.text.lower()
    assets = _local_assets(r.text)
    assert any(a.endswith(".js") for a in assets)
    for asset in assets:
        assert asset.startswith("/"), asset
        got = client.get(asset)
        assert got.status_code == 200 and len(got.content) > 0, asset
    assert "'/openapi.json'" in r.text or '"/openapi.json"' in r.text
    assert client.get("/openapi.json").json()["info"]["title"] == "agnews-lora"


def test_16_without_the_assets_docs_say_so_and_link_the_schema(clf, monkeypatch):
    monkeypatch.setattr(serve_mod, "docs_assets", lambda: None)
    with TestClient(create_app(clf)) as c:
        for page in ("/docs", "/redoc"):
            r = c.get(page)
            assert r.status_code == 200 and "need the Swagger UI and ReDoc scripts" in r.text
            assert '<a href="/openapi.json">' in r.text and '<a href="/redoc">' in r.text
            assert "<script" not in r.text and "https://" not in r.text
        assert c.get("/openapi.json").status_code == 200


def test_16_no_docs_means_no_docs_and_no_assets(clf):
    with TestClient(create_app(clf, docs=False)) as c:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs-assets/swagger-ui-bundle.js"):
            assert c.get(path).status_code == 404, path


@pytest.mark.parametrize("path", ["/", "/health", "/info", "/openapi.json"])
def test_16_head_is_answered_like_get_without_a_body(client, path):
    get, head = client.get(path), client.head(path)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if path in ("/", "/openapi.json"):  # /health and /info change between two calls
        assert head.headers["content-length"] == get.headers["content-length"]


def test_16_head_of_a_post_route_is_405(client):
    assert client.head("/predict").status_code == 405


def test_16_head_and_smuggling_on_a_real_server(clf):
    body = b'{"texts": ["Stocks rally"]}'
    chunked = hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n"
    with live_server(create_app(clf)) as url:
        answer = _raw_request(url, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n")
        answer = _raw_request(url, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
        assert answer.startswith(b"HTTP/1.1 400") and b"connection: close" in answer.lower()
        assert httpx.get(f"{url}/health", timeout=10).json()["requests"] == 0
        # Each framing alone is served.
        answer = _raw_request(url, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                   b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked)
        assert answer.startswith(b"HTTP/1.1 200")


def test_16_smuggling_message_names_both_headers(client):
    r = client.post("/predict", content=b'{"texts": ["a"]}',
                    headers={"content-type": "application/json", "content-length": "15",
                             "transfer-encoding": "chunked"})
    assert r.status_code == 400 and "both Content-Length and Transfer-Encoding" in r.json()["detail"]
