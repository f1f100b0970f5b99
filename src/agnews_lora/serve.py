"""A thin HTTP app over Classifier: POST /predict, GET /health, GET /info, and a demo page at GET /
(FastAPI + uvicorn).

Requests are micro-batched: texts from requests arriving within `max_wait_ms` of each other go
through the model in one call (up to `max_batch` texts), which serves many small concurrent
requests at nearly the throughput of one large batch. Requests are JSON only; nothing from a
request is ever unpickled. The demo page (static/demo.html, package data) is one self-contained
HTML file whose script calls POST /predict. The API docs (/docs, /redoc) load their scripts from
this service (package fastapi-offline, in the serve extra), never from the internet.

Hostile clients are bounded: a request body is read whole, within a size and a time limit, before
the app sees it; an error answer never echoes a value JSON cannot carry back (NaN, Infinity); and
after SIGTERM the server exits within SHUTDOWN_GRACE_S seconds whatever its clients do.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Callable

import numpy as np

from agnews_lora.extras import require

require("serve", "agnews_lora.serve (the HTTP service)")  # before the imports below fail less clearly
from fastapi import FastAPI, HTTPException, Request  # noqa: E402
from fastapi.encoders import jsonable_encoder  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402

from agnews_lora.errors import ConfigError, finite  # noqa: E402
from agnews_lora.data import clean_text  # noqa: E402
from agnews_lora.predict import BATCH_PRIORS, Classifier, package_version, parse_prior  # noqa: E402

MAX_ERRORS = 20  # errors listed in one 422: a huge bad request must not get a huger answer
MAX_ECHO = 80  # characters of a bad value an error answer shows
BODY_TIMEOUT_S = 10.0  # a request body not all here by then gets 408: a client trickling bytes holds nothing open
SHUTDOWN_GRACE_S = 5.0  # after SIGTERM, requests still open by then are cancelled and the server exits
DOCS_ASSETS = "/docs-assets"  # where the API docs' scripts are served from (package fastapi-offline)
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
            if not _is_count(value):
                raise ConfigError(f"Limits.{key}={value!r}: must be >= 1 (a whole number)")


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
        self.max_wait_ms = check_batching(self.max_batch, self.max_wait_ms)
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


def check_batching(max_batch: int, max_wait_ms: float) -> float:
    """Raise ConfigError unless max_batch is a whole number >= 1 and max_wait_ms a finite number >= 0
    (an infinite wait would hold every request forever).

    Returns:
        max_wait_ms as a float.
    """
    wait = finite(max_wait_ms, "max_wait_ms")
    if not _is_count(max_batch) or wait < 0:
        raise ConfigError(f"MicroBatcher: max_batch={max_batch!r} must be >= 1 (a whole number) and "
                          f"max_wait_ms={max_wait_ms!r} >= 0")
    return wait


def check_body_timeout(body_timeout_s: float) -> float:
    """body_timeout_s as a float; ConfigError unless it is a finite number > 0."""
    seconds = finite(body_timeout_s, "body_timeout_s")
    if seconds <= 0:
        raise ConfigError(f"body_timeout_s={body_timeout_s!r}: must be > 0")
    return seconds


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class BodySizeLimit:
    """ASGI middleware: the request body is read whole, within limits, before the app runs.

    413 for a body over `max_bytes` (declared or streamed: the rest is never buffered); 408 when the
    body has not all arrived within `timeout_s` seconds, so a client trickling bytes holds no request
    open; 400 for a request with both Content-Length and Transfer-Encoding, whose body two readers
    (a proxy and this server) may frame differently: request smuggling.
    """

    def __init__(self, app, max_bytes: int, timeout_s: float = BODY_TIMEOUT_S):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = check_body_timeout(timeout_s)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        names = {name for name, _ in scope["headers"]}
        if {b"content-length", b"transfer-encoding"} <= names:
            return await _refuse(scope, receive, send, 400, "the request has both Content-Length and "
                                 "Transfer-Encoding; send one of them (a body framed two ways is refused)")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send, f"{int(declared):,}")
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await self._read(receive)
        except TimeoutError:
            return await _refuse(scope, receive, send, 408, f"the request body did not arrive within "
                                 f"{self.timeout_s:g} s; send it whole, at once")
        except _TooLarge as err:
            return await self._too_large(scope, receive, send, f"at least {err.args[0]:,}")
        if body is None:  # the client went away
            return None
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | None:
        """The whole body, or None when the client disconnects; raises _TooLarge(size read) as soon
        as it passes max_bytes."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                raise _TooLarge(size)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _too_large(self, scope, receive, send, size: str) -> None:
        await _refuse(scope, receive, send, 413, f"request body has {size} bytes; the limit is "
                                                 f"{self.max_bytes:,} (serve --max-body-bytes)")


class _TooLarge(Exception):
    pass


async def _refuse(scope, receive, send, status: int, detail: str) -> None:
    """Answer `status` and close the connection: the rest of the request is never read."""
    await JSONResponse({"detail": detail}, status_code=status,
                       headers={"Connection": "close"})(scope, receive, send)


class HeadAsGet:
    """ASGI middleware: HEAD is answered as GET without the body (RFC 9110), on every GET route;
    FastAPI routes answer only the methods they name."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        return await self.app({**scope, "method": "GET"}, receive, headers_only)


def create_app(clf: Classifier, limits: Limits | None = None, max_batch: int = 64, max_wait_ms: float = 5.0,
               batch_size: int = 64, prior: str | None = None, docs: bool = True,
               body_timeout_s: float = BODY_TIMEOUT_S):
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
        body_timeout_s: seconds a request body may take to arrive (HTTP 408 after).

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

    # FastAPI's own /docs and /redoc load their scripts from a CDN: blank pages offline. add_docs serves them.
    app = FastAPI(title="agnews-lora", version=package_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None,
                  description=f"Text classification into {clf.num_labels} classes: {', '.join(clf.label_names)}")
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes, timeout_s=body_timeout_s)
    app.add_middleware(HeadAsGet)
    app.add_exception_handler(RequestValidationError, validation_error)
    if docs:
        add_docs(app)
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


def add_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc with their scripts served by this app from the package
    fastapi-offline (serve extra), so they render without internet. Without that package both
    pages say so and link the schema at /openapi.json; nothing is fetched from elsewhere."""
    title = f"{app.title} - API docs"
    assets = docs_assets()
    if assets is None:
        page = DOCS_OFFLINE_PAGE.format(title=title)

        async def offline() -> HTMLResponse:
            return HTMLResponse(page)

        for path in ("/docs", "/redoc"):
            app.add_api_route(path, offline, include_in_schema=False)
        return
    app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=title,
                                   swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no badge from swagger.io

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=title, with_google_fonts=False,
                              redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png")


DOCS_OFFLINE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title></head><body>
<h1>{title}</h1>
<p>The interactive API docs need the Swagger UI and ReDoc scripts, which are not installed with this
service, and it does not load them from the internet. Install them with
<code>pip install 'agnews-lora[serve]'</code> (package fastapi-offline) and restart the service.</p>
<p>The API schema (OpenAPI): <a href="/openapi.json">/openapi.json</a>. <a href="/redoc">/redoc</a>
(the same docs) needs the same scripts. The demo page: <a href="/">/</a>.</p>
<p>Classify texts: <code>POST /predict {{"texts": ["..."]}}</code>; also <code>GET /health</code>,
<code>GET /info</code>.</p>
</body></html>
"""


def docs_assets() -> Path | None:
    """The folder of Swagger UI and ReDoc scripts shipped by fastapi-offline, or None when it is not installed."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0]) / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def demo_page() -> str:
    """The demo page's HTML, read from the package data (src/agnews_lora/static/demo.html)."""
    return resources.files("agnews_lora").joinpath("static", "demo.html").read_text(encoding="utf-8")


class ErrorResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a lone surrogate from the request (in a key or
    a string) cannot fail the encoding, as it does in JSONResponse (a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


async def validation_error(request, exc: RequestValidationError) -> JSONResponse:
    """422 with pydantic's errors, each showing the bad value as `shown` writes it. FastAPI's own
    handler echoes the value itself and answers 500 when JSON cannot carry it back: NaN, Infinity
    or 1e999 (JSON that Python reads), a body that is not UTF-8 (e.g. a pickle), a lone surrogate."""
    errors = []
    for raw in exc.errors()[:MAX_ERRORS]:
        error = {**raw, "input": shown(raw["input"])} if "input" in raw else dict(raw)
        if tuple(error["loc"]) == ("body",):  # the body as a whole is not a JSON object
            error["msg"] += '; send a JSON object {"texts": [...]} with Content-Type: application/json'
        errors.append(error)
    return ErrorResponse({"detail": jsonable_encoder(errors)}, status_code=422)


def shown(value: Any) -> str:
    """A request's value as an error answer shows it: its JSON text (NaN, Infinity for non-finite
    numbers, as a client would write them), ASCII only, cut to MAX_ECHO characters; never the value
    itself, which JSON may not be able to carry back. Bytes (a body that is not JSON) are decoded."""
    if isinstance(value, bytes):
        value = value[: 4 * MAX_ECHO].decode("utf-8", "replace")
    if isinstance(value, str):
        value = value[:MAX_ECHO]
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= MAX_ECHO else text[: MAX_ECHO - 3] + "..."


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
            value = shown(text)
            errors.append({"loc": ["body", "texts", i], "type": "string_type", "input": value,
                           "msg": f"texts[{i}] is {value}, not a string: send the text to classify as a JSON string"})
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
          prior: str | None = None, docs: bool = True, body_timeout_s: float = BODY_TIMEOUT_S) -> None:
    """Load the model once and serve it with uvicorn until interrupted (Ctrl+C or SIGTERM: requests
    still open SHUTDOWN_GRACE_S seconds later are cancelled, whatever the clients do).

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
        body_timeout_s: see `create_app`.
    """
    import torch
    import uvicorn

    if not 0 <= port <= 65535:
        raise ConfigError(f"serve: port {port} must be in 0..65535")
    check_batching(max_batch, max_wait_ms)  # before the model loads
    check_body_timeout(body_timeout_s)
    if threads:
        torch.set_num_threads(threads)
    clf = Classifier.load(model_dir, precision=precision, threads=threads)
    app = create_app(clf, limits=limits, max_batch=max_batch, max_wait_ms=max_wait_ms, prior=prior, docs=docs,
                     body_timeout_s=body_timeout_s)
    print(f"serving {model_dir} ({clf.info.get('format')}, {clf.precision}) on http://{host}:{port} "
          "- demo page at /, POST /predict {\"texts\": [...]}, GET /health, GET /info")
    # Without a grace period uvicorn waits for every open request after SIGTERM, for ever.
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
