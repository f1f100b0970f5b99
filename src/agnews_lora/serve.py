"""A thin HTTP app over Classifier: POST /predict, GET /health, GET /info, and a demo page at GET /
(FastAPI + uvicorn).

Requests are micro-batched: texts from requests arriving within `max_wait_ms` of each other go
through the model in one call (up to `max_batch` texts), which serves many small concurrent
requests at nearly the throughput of one large batch. Requests are JSON only; nothing from a
request is ever unpickled. The demo page (static/demo.html, package data) is one self-contained
HTML file whose script calls POST /predict.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Callable

import numpy as np

from agnews_lora.extras import require

require("serve", "agnews_lora.serve (the HTTP service)")  # before the imports below fail less clearly
from fastapi import FastAPI, HTTPException  # noqa: E402
from fastapi.encoders import jsonable_encoder  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from agnews_lora.config import ConfigError  # noqa: E402
from agnews_lora.data import clean_text  # noqa: E402
from agnews_lora.predict import BATCH_PRIORS, Classifier, package_version, parse_prior  # noqa: E402

MAX_ERRORS = 20  # errors listed in one 422: a huge bad request must not get a huger answer
# The demo page may run its own inline script and style and talk to this service only: nothing is
# fetched from elsewhere, and it cannot be framed by another site.
DEMO_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Items are checked by `check_texts` after the count (413 before any per-item work): pydantic
    # would validate every item of an oversized list first and answer with one error per item.
    texts: Annotated[list[Any], Field(min_length=1, description="texts to classify (at least one)",
                                      json_schema_extra={"items": {"type": "string"}})]


class PredictResponse(BaseModel):
    labels: list[int]
    names: list[str]
    probabilities: list[list[float]]
    label_names: list[str]


@dataclass
class Limits:
    """What one request may hold; a request over a limit gets HTTP 413 naming it."""

    max_texts: int = 64  # texts per request
    max_chars: int = 10_000  # characters per text (AG News rows are ~240)
    max_body_bytes: int = 1_000_000  # request body

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if value < 1:
                raise ConfigError(f"Limits.{key}={value}: must be >= 1")


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future


@dataclass
class BatchStats:
    requests: int = 0
    texts: int = 0
    model_calls: int = 0
    largest_batch: int = 0


@dataclass
class MicroBatcher:
    """Collects requests for up to `max_wait_ms` (or `max_batch` texts) and runs them as one call.

    `predict` runs in one worker thread, so the event loop keeps answering (e.g. /health) while
    the model computes, and model calls never overlap.
    """

    predict: Callable[[list[str]], np.ndarray]
    max_batch: int = 64
    max_wait_ms: float = 5.0
    stats: BatchStats = field(default_factory=BatchStats)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_wait_ms < 0:
            raise ConfigError(f"MicroBatcher: max_batch={self.max_batch} must be >= 1 and max_wait_ms="
                              f"{self.max_wait_ms} >= 0")
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def submit(self, texts: list[str]) -> np.ndarray:
        """Queue texts; return their rows of `predict`'s output once their batch has run."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._loop is not loop:
            # Started on first use, inside the loop that serves (the app's or a test client's).
            self._loop, self._queue = loop, asyncio.Queue()
            self._executor = self._executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
            self._worker = loop.create_task(self._run())
        item = _Pending(texts, loop.create_future())
        await self._queue.put(item)
        return await item.future

    async def close(self) -> None:
        """Stop the worker (the app's shutdown); a later submit starts a new one."""
        if self._worker is not None:
            self._worker.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._worker = self._executor = None

    async def _collect(self, first: _Pending) -> tuple[list[_Pending], _Pending | None]:
        """`first` plus what arrives within the wait, up to max_batch texts; returns the batch
        and a request that would have overflowed it (it starts the next batch)."""
        batch, n = [first], len(first.texts)
        deadline = asyncio.get_running_loop().time() + self.max_wait_ms / 1000
        while n < self.max_batch:
            timeout = deadline - asyncio.get_running_loop().time()
            if timeout <= 0:
                break
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout)
            except asyncio.TimeoutError:
                break
            if n + len(item.texts) > self.max_batch:
                return batch, item
            batch.append(item)
            n += len(item.texts)
        return batch, None

    async def _run(self) -> None:
        carry = None
        loop = asyncio.get_running_loop()
        while True:
            first = carry if carry is not None else await self._queue.get()
            batch, carry = await self._collect(first)
            texts = [t for item in batch for t in item.texts]
            try:
                out = await loop.run_in_executor(self._executor, self.predict, texts)
            except Exception as err:
                await self._run_alone(batch, err)
                continue
            self._record(batch, len(texts))
            start = 0
            for item in batch:
                if not item.future.done():  # a client that went away leaves a cancelled future
                    item.future.set_result(out[start : start + len(item.texts)])
                start += len(item.texts)

    async def _run_alone(self, batch: list[_Pending], err: Exception) -> None:
        """A failed shared call: run each request by itself, so only the one that fails gets the
        error (a 500); the worker keeps serving."""
        loop = asyncio.get_running_loop()
        for item in batch:
            if item.future.done():
                continue
            if len(batch) == 1:
                item.future.set_exception(err)
                continue
            try:
                out = await loop.run_in_executor(self._executor, self.predict, item.texts)
            except Exception as own:
                item.future.set_exception(own)
                continue
            self._record([item], len(item.texts))
            if not item.future.done():
                item.future.set_result(out)

    def _record(self, batch: list[_Pending], n_texts: int) -> None:
        self.stats.requests += len(batch)
        self.stats.texts += n_texts
        self.stats.model_calls += 1
        self.stats.largest_batch = max(self.stats.largest_batch, n_texts)


class BodySizeLimit:
    """ASGI middleware: 413 for a request body over `max_bytes`, declared or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send, f"{int(declared):,}")
        chunks, size = [], 0
        while True:  # read the body here (bounded), so a chunked upload cannot grow past the limit
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:  # stop reading: the rest of the body is never buffered
                return await self._reject(scope, receive, send, f"at least {size:,}")
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send, size: str) -> None:
        detail = f"request body has {size} bytes; the limit is {self.max_bytes:,} (serve --max-body-bytes)"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def create_app(clf: Classifier, limits: Limits | None = None, max_batch: int = 64, max_wait_ms: float = 5.0,
               batch_size: int = 64, prior: str | None = None, docs: bool = True):
    """The FastAPI app serving `clf`.

    Args:
        clf: the loaded Classifier (run folder, merged or ONNX export).
        limits: per-request limits (default Limits()).
        max_batch: most texts in one model call made from several requests.
        max_wait_ms: how long the first request of a batch waits for others.
        batch_size: texts per forward pass inside a model call.
        prior: None (the training prior), "uniform" or shares per class ("0.2,0.3,0.2,0.3"): the
            probabilities (at the run's fitted temperature) are corrected to it. EM estimation
            needs a whole unlabelled batch, which a service does not see: refused.
        docs: serve the interactive API docs (/docs, /redoc, /openapi.json).

    Returns:
        The app; run it with uvicorn (see `serve`) or test it with fastapi.testclient.
    """
    limits = limits or Limits()
    if prior in BATCH_PRIORS:
        raise ConfigError(f"prior {prior!r} works on a whole unlabelled batch (it re-estimates or matches the "
                          "prior over all of its rows); a service sees requests one by one: give the prior "
                          f"('uniform' or shares per class), or use `predict --prior {prior}` on a file")
    if prior is not None:
        parse_prior(prior, clf.num_labels)
    batcher = MicroBatcher(lambda texts: clf.predict_proba(texts, batch_size=batch_size, prior=prior),
                           max_batch=max_batch, max_wait_ms=max_wait_ms)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await batcher.close()

    hidden = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="agnews-lora", version=package_version(), lifespan=lifespan,
                  description="AG News topic classification (World, Sports, Business, Sci/Tech)", **hidden)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.state.batcher = batcher
    page = demo_page()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def demo() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": DEMO_CSP})

    @app.post("/predict", response_model=PredictResponse)
    async def predict(request: PredictRequest) -> PredictResponse:
        check_limits(request.texts, limits)
        check_texts(request.texts)
        probs = await batcher.submit(request.texts)
        labels = probs.argmax(-1).tolist()
        return PredictResponse(labels=labels, names=[clf.label_names[i] for i in labels],
                               probabilities=probs.round(6).tolist(), label_names=clf.label_names)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **asdict(batcher.stats)}

    @app.get("/info")
    async def info() -> dict:
        return {**public_info(clf.info), "labels": clf.label_names, "max_length": clf.cfg.data.max_length,
                "precision": clf.precision, "backend": "onnxruntime" if clf.onnx else "torch",
                "temperature": clf.temperature, "prior": prior or "training",
                "version": package_version(), "limits": asdict(limits),
                "batching": {"max_batch": max_batch, "max_wait_ms": max_wait_ms}}
    return app


def demo_page() -> str:
    """The demo page's HTML, read from the package data (src/agnews_lora/static/demo.html)."""
    return resources.files("agnews_lora").joinpath("static", "demo.html").read_text(encoding="utf-8")


async def validation_error(request, exc: RequestValidationError) -> JSONResponse:
    """422 with pydantic's errors. A body that is not UTF-8 (e.g. a pickle) is echoed decoded with
    replacement characters: FastAPI's own handler fails to encode it and answers 500."""
    errors = [{**e, "input": e["input"].decode("utf-8", "replace")} if isinstance(e.get("input"), bytes) else e
              for e in exc.errors()[:MAX_ERRORS]]
    for e in errors:
        if tuple(e["loc"]) == ("body",):  # the body as a whole is not a JSON object
            e["msg"] += '; send a JSON object {"texts": [...]} with Content-Type: application/json'
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


def public_info(info: dict) -> dict:
    """/info without paths on the server's disk: a folder shows as its name."""
    out = dict(info)
    for key in ("source", "model"):
        value = out.get(key)
        # A Hub id ("org/model") is public; a folder on this machine is shown by its name only.
        if isinstance(value, str) and (Path(value).is_absolute() or Path(value).expanduser().exists()):
            out[key] = Path(value).name
    return out


def check_limits(texts: list, limits: Limits) -> None:
    """Raise HTTPException(413) naming the limit a request breaks (the count first: cheap)."""
    if len(texts) > limits.max_texts:
        raise HTTPException(413, f"{len(texts)} texts in one request; the limit is {limits.max_texts} "
                                 "(serve --max-texts); split the request")
    for i, text in enumerate(texts):
        if isinstance(text, str) and len(text) > limits.max_chars:
            raise HTTPException(413, f"texts[{i}] has {len(text):,} characters; the limit is "
                                     f"{limits.max_chars:,} (serve --max-chars)")


def check_texts(texts: list) -> None:
    """Raise HTTPException(422) naming every bad text (at most MAX_ERRORS): not a string, not
    encodable as UTF-8 (a lone surrogate), or empty once cleaned (as the CLI refuses such rows)."""
    errors = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            errors.append({"loc": ["body", "texts", i], "type": "string_type", "msg": "Input should be a valid string",
                           "input": text if isinstance(text, (int, float, bool)) or text is None else str(text)[:80]})
        elif not _encodable(text):
            errors.append({"loc": ["body", "texts", i], "type": "unicode",
                           "msg": f"texts[{i}] is not valid Unicode (a lone surrogate); send UTF-8 text"})
        elif not clean_text(text):
            errors.append({"loc": ["body", "texts", i], "type": "empty",
                           "msg": f"texts[{i}] is empty or only whitespace; send a text to classify"})
        if len(errors) >= MAX_ERRORS:
            break
    if errors:
        raise HTTPException(422, errors)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          precision: str = "auto", threads: int | None = None, max_batch: int = 64, max_wait_ms: float = 5.0,
          prior: str | None = None, docs: bool = True) -> None:
    """Load the model once and serve it with uvicorn until interrupted.

    Args:
        model_dir: a run folder, or a merged/ONNX folder written by `export`.
        host: interface to bind; 127.0.0.1 (this machine only) unless told otherwise.
        port: TCP port.
        limits: per-request limits.
        precision: torch models: "auto", "bf16" or "fp32".
        threads: CPU threads for the model (None: one per physical core). torch's count is
            process-wide; `serve` owns the process until interrupted, so it sets it here.
        max_batch: most texts per micro-batched model call.
        max_wait_ms: micro-batching window.
        prior: see `create_app`.
        docs: serve the interactive API docs at /docs (and /redoc, /openapi.json).
    """
    import torch
    import uvicorn

    if not 0 <= port <= 65535:
        raise ConfigError(f"serve: port {port} must be in 0..65535")
    if threads:
        torch.set_num_threads(threads)
    clf = Classifier.load(model_dir, precision=precision, threads=threads)
    app = create_app(clf, limits=limits, max_batch=max_batch, max_wait_ms=max_wait_ms, prior=prior, docs=docs)
    print(f"serving {model_dir} ({clf.info.get('format')}, {clf.precision}) on http://{host}:{port} "
          "- demo page at /, POST /predict {\"texts\": [...]}, GET /health, GET /info")
    uvicorn.run(app, host=host, port=port, log_level="info")
