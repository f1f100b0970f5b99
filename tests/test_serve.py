"""The HTTP service in-process: predictions, limits, wrong types, micro-batching, a real socket."""

from __future__ import annotations

import asyncio
import json
import pickle

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import live_server

from agnews_lora.cli import build_parser
from agnews_lora.config import ConfigError
from agnews_lora.data import read_files
from agnews_lora.predict import Classifier
from agnews_lora.serve import BodySizeLimit, Limits, MicroBatcher, create_app

LIMITS = Limits(max_texts=8, max_chars=1000, max_body_bytes=6000)


@pytest.fixture(scope="module")
def clf(tiny_run) -> Classifier:
    return Classifier.load(tiny_run, precision="fp32")


@pytest.fixture(scope="module")
def texts(ag_files) -> list[str]:
    return read_files([ag_files["test"]]).texts


@pytest.fixture
def app(clf):
    return create_app(clf, limits=LIMITS, max_batch=64, max_wait_ms=50)


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        yield c


def test_predict_returns_labels_names_and_probabilities(client, clf, texts):
    r = client.post("/predict", json={"texts": texts[:5]})
    assert r.status_code == 200
    body = r.json()
    expected = clf.predict_proba(texts[:5])
    assert body["labels"] == expected.argmax(-1).tolist()
    assert body["names"] == [clf.label_names[i] for i in body["labels"]]
    assert body["label_names"] == ["World", "Sports", "Business", "Sci/Tech"]
    np.testing.assert_allclose(body["probabilities"], expected, atol=1e-5)
    np.testing.assert_allclose(np.sum(body["probabilities"], axis=1), 1.0, atol=1e-4)


def test_health_and_info(client, tiny_run):
    client.post("/predict", json={"texts": ["Stocks rally"]})
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["requests"] == 1 and health["model_calls"] == 1
    info = client.get("/info").json()
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert info["trainable"] == summary["trainable"]["total"] > 0
    assert info["labels"] == ["World", "Sports", "Business", "Sci/Tech"]
    assert info["format"] == "run" and info["source"] == tiny_run.name and info["backend"] == "torch"  # no disk path
    assert info["version"] and info["limits"] == {"max_texts": 8, "max_chars": 1000, "max_body_bytes": 6000}


@pytest.mark.parametrize("body,message", [
    ({"texts": ["a"] * 9}, "9 texts in one request; the limit is 8 (serve --max-texts)"),
    ({"texts": ["ok", "x" * 1001]}, "texts[1] has 1,001 characters; the limit is 1,000 (serve --max-chars)"),
])
def test_request_limits_give_413_with_the_limit_named(client, body, message):
    r = client.post("/predict", json=body)
    assert r.status_code == 413 and message in r.json()["detail"]


def test_body_size_limit_declared_and_streamed(client):
    big = json.dumps({"texts": ["y" * 900] * 7}).encode()  # within the text limits, over the body limit
    r = client.post("/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "the limit is 6,000 (serve --max-body-bytes)" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(70):
            yield b" " * 100

    r = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "the limit is 6,000" in r.json()["detail"]


def test_body_size_limit_stops_reading_a_long_stream():
    """At the ASGI level: 100-byte chunks without Content-Length; the app behind never runs."""
    received, sent = [], []

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b"x" * 100, "more_body": True}  # endless

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        raise AssertionError("the app must not see an oversized body")

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [], "query_string": b""}
    asyncio.run(BodySizeLimit(app, max_bytes=250)(scope, receive, send))
    assert sent[0]["status"] == 413 and len(received) == 3
    assert json.loads(sent[1]["body"])["detail"] == ("request body has at least 300 bytes; the limit is 250 "
                                                     "(serve --max-body-bytes)")


@pytest.mark.parametrize("body", [{"texts": [1, 2]}, {"texts": "one text"}, {"texts": [["nested"]]}, {},
                                  {"text": ["typo"]}, {"texts": ["a"], "extra": 1}, {"texts": None}])
def test_wrong_types_give_422(client, body):
    r = client.post("/predict", json=body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "body"


def test_empty_list_gives_422_naming_the_minimum(client):
    r = client.post("/predict", json={"texts": []})
    assert r.status_code == 422
    assert "at least 1 item" in r.json()["detail"][0]["msg"] and r.json()["detail"][0]["loc"] == ["body", "texts"]


def test_non_json_bodies_are_rejected_never_unpickled(client):
    payload = pickle.dumps({"texts": ["a"]})
    for kind in ("application/octet-stream", "application/python-pickle", "text/plain"):
        r = client.post("/predict", content=payload, headers={"content-type": kind})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"]
        assert "send a JSON object" in r.json()["detail"][0]["msg"]
    r = client.post("/predict", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error parsing the body" in r.json()["detail"]  # not UTF-8 JSON
    assert client.get("/health").json()["model_calls"] == 0


def test_twenty_parallel_requests_are_micro_batched_and_all_correct(app, clf, texts):
    expected = clf.predict(texts[:20])

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            responses = await asyncio.gather(*(ac.post("/predict", json={"texts": [t]}) for t in texts[:20]))
            return responses, (await ac.get("/health")).json()

    responses, health = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * 20
    assert [r.json()["labels"][0] for r in responses] == expected
    assert health["requests"] == 20 and health["texts"] == 20
    assert health["model_calls"] < 20 and health["largest_batch"] > 1  # requests shared model calls


def test_micro_batcher_keeps_max_batch_and_survives_a_failing_call():
    calls: list[list[str]] = []

    def predict(batch: list[str]) -> np.ndarray:
        calls.append(batch)
        if "boom" in batch:
            raise RuntimeError("model failed")
        return np.array([[float(len(t))] for t in batch])

    async def go():
        batcher = MicroBatcher(predict, max_batch=5, max_wait_ms=30)
        results = await asyncio.gather(*(batcher.submit([f"t{i}", f"tt{i}"]) for i in range(6)))
        with pytest.raises(RuntimeError, match="model failed"):
            await batcher.submit(["boom"])
        after = await batcher.submit(["abc"])
        await batcher.close()
        return results, after

    results, after = asyncio.run(go())
    assert [r[:, 0].tolist() for r in results] == [[2.0, 3.0]] * 6  # each request gets its own rows back
    assert max(len(c) for c in calls) <= 5 and after.tolist() == [[3.0]]


def test_limits_and_batching_settings_are_checked():
    # The library names its own arguments; only the CLI speaks of flags.
    with pytest.raises(ConfigError, match="Limits.max_texts=0: must be >= 1") as err:
        Limits(max_texts=0)
    assert "--" not in str(err.value)
    with pytest.raises(ConfigError, match="max_batch=0") as err:
        MicroBatcher(lambda t: t, max_batch=0)
    assert "--" not in str(err.value)
    for flag in ("--max-texts", "--max-batch"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "some/folder", flag, "0"])


def test_serve_flags_are_checked_by_the_cli(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "some/folder", "--max-wait-ms", "-1"])
    assert "argument --max-wait-ms: -1.0 must be >= 0" in capsys.readouterr().err


def test_serve_binds_localhost_by_default():
    args = build_parser().parse_args(["serve", "some/folder"])
    assert (args.host, args.port, args.max_texts) == ("127.0.0.1", 8000, 64)


def test_real_http_server_on_localhost(app, clf, texts):
    with live_server(app) as url:
        r = httpx.post(f"{url}/predict", json={"texts": texts[:3]}, timeout=30)
        assert r.status_code == 200 and r.json()["labels"] == clf.predict(texts[:3])
