"""``esm-index serve``: one long-lived process that keeps the base model, the open indexes
and their FAISS prefilters warm, and ranks over HTTP with JSON.

Why a service: a fresh ``esm-index rank`` pays seconds of start-up (torch, the model, FAISS,
compiled kernels) for a query that takes a fraction of a second warm (BENCHMARKS.md section 7).
AutoML systems also tend to live in
another process or language. The API (OpenAPI schema at ``/openapi.json``, docs at ``/docs``):

    GET  /health                        liveness and uptime (no token needed)
    GET  /indexes                       every served index: name, folder, sources, model, ...
    GET  /indexes/{name}/sources        the sources of one index
    POST /rank                          one or many targets, texts or base embeddings + labels

Safety rules, each tested (tests/test_server.py): loopback by default and a bearer token
required when bound anywhere else; request body, targets and rows are capped; every bad
request is a 4xx with one line of JSON ``{"error": ..., "type": ...}`` (``type`` names the
class in errors.py, which client.py raises again); a client that disconnects leaves the
server healthy; SIGTERM stops accepting, finishes the requests in flight, closes the indexes.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .checks import check_labels, check_size
from .data import labelled
from .errors import EsmIndexError, IndexStoreError, InvalidArgumentError
from . import query as query_path
from .index import SourceIndex
from .results import Filters, Query, Ranking
from .schema import ErrorResponse, RankRequest, RankResponse, Target

log = logging.getLogger("esm_index.server")
OPEN_PATHS = ("/health",)  # answered without the token: a load balancer's liveness probe


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. 20,000 rows of 384-d embeddings are ~80 MB of JSON."""

    max_body_mb: float = 64.0
    max_rows: int = 20_000
    max_targets: int = 64
    workers: int = 2  # queries computed at once, each on its own thread; more wait
    # numba / FAISS threads inside one query; None: all cores shared among the queries running
    # at that moment (a lone query gets every core, two get half each); 0: the libraries' default
    threads_per_query: int | None = None


# ---- the warm state ---------------------------------------------------------------------------
class Service:
    """The open indexes (read-only, so a writer in another process can add sources: a new
    LMDB generation reloads the prefilter), one embedding lock per index (a fast tokenizer
    must not be entered from two threads) and the query threads.

    Queries run on ``workers`` long-lived threads, never on the HTTP threads. Two reasons
    (measured in BENCHMARKS.md section 7): numba's OpenMP kernels keep a thread team per
    calling thread, so queries hopping over uvicorn's pool threads left teams spinning; and
    OpenMP regions of several threads stall when another job holds a core, so each query
    thread runs its kernels with few threads: by default the cores divided among the queries
    running when it starts (a lone client's query gets every core), or a fixed
    ``threads_per_query``; concurrency comes from the ``workers``."""

    def __init__(self, folders: dict[str, Path], limits: Limits = Limits(), warm: bool = True) -> None:
        if not folders:
            raise InvalidArgumentError("no index to serve")
        self.limits = limits
        self.indexes = {name: SourceIndex(folder, readonly=True) for name, folder in folders.items()}
        self._embed_locks = {name: threading.Lock() for name in folders}
        self._queries = ThreadPoolExecutor(limits.workers, thread_name_prefix="esm-query",
                                           initializer=_query_thread, initargs=(limits.threads_per_query or 0,))
        self._running, self._running_lock = 0, threading.Lock()
        self._cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.started = time.time()
        if warm:  # on a query thread: see _warm
            for index in self.indexes.values():
                self._queries.submit(_warm, index).result()

    def close(self) -> None:
        self._queries.shutdown(wait=True)
        for index in self.indexes.values():
            index.close()

    def lookup(self, name: str | None) -> str:
        """A served index's name, from its name or the folder it was served from."""
        if name is None:
            return next(iter(self.indexes))
        if name in self.indexes:
            return name
        for key, index in self.indexes.items():
            if Path(name).resolve() == index.folder.resolve():
                return key
        error = IndexStoreError(f"no served index named {name!r} (served: {', '.join(self.indexes)})")
        error.http_status = 404
        raise error

    def info(self, name: str) -> dict:
        index = self.indexes[name]
        m = index.manifest
        return {"name": name, "folder": str(index.folder.resolve()), "sources": len(index),
                "model": m["embedding"]["model_name"], "embedding": m["embedding"], "dim": m["dim"],
                "esm_dtype": m["esm_dtype"], "generation": index.store.generation()}

    def rank(self, req: RankRequest) -> list[Ranking]:
        """Check every target first (cheap), then rank them one after the other in one slot."""
        name = self.lookup(req.index)
        index = self.indexes[name]
        if len(req.targets) > self.limits.max_targets:
            raise InvalidArgumentError(f"{len(req.targets)} targets in one request; the limit is "
                                       f"{self.limits.max_targets}")
        prepared = [self._prepare(index, t, i) for i, t in enumerate(req.targets)]
        filters = Filters(**req.filters.model_dump()) if req.filters else None
        query = Query(top=req.top, shortlist=req.shortlist, candidates=req.candidates, refine=req.refine,
                      exact=req.exact, filters=filters, method=req.method)
        return self._queries.submit(self._run, name, prepared, query, time.perf_counter()).result()

    def _run(self, name: str, prepared: list, query: Query, queued: float) -> list[Ranking]:
        """On a query thread: embed (cached by content) and rank each target in turn, with
        this query's share of the cores (``Limits.threads_per_query``)."""
        index, rankings, waited = self.indexes[name], [], time.perf_counter() - queued
        with self._running_lock:
            self._running += 1
            share = max(1, self._cores // self._running)
        try:
            if self.limits.threads_per_query is None:
                _query_thread(share)
            for texts, x, data in prepared:
                t0 = time.perf_counter()
                if x is None:
                    with self._embed_locks[name]:
                        x = index.embed(texts)
                embed_s = time.perf_counter() - t0
                ranking = query_path.run(index, x, data.labels, data.task, query)
                head = {"queue": round(waited, 4)} | ({"embed": round(embed_s, 4)} if texts is not None else {})
                ranking.timings = {**head, **ranking.timings}
                rankings.append(ranking)
                waited = 0.0
            return rankings
        finally:
            with self._running_lock:
                self._running -= 1

    def _prepare(self, index: SourceIndex, target: Target, number: int):
        """(texts or None, embeddings or None, encoded labels): refuses what cannot be ranked
        before anything slow (embedding) starts."""
        if (target.texts is None) == (target.embeddings is None):
            raise InvalidArgumentError(f"target {number}: give texts or embeddings (one of them)")
        rows = len(target.texts if target.texts is not None else target.embeddings)
        if rows > self.limits.max_rows:
            raise InvalidArgumentError(f"target {number} has {rows} rows; the limit is {self.limits.max_rows}")
        labels = target.labels
        several = bool(labels) and any(isinstance(v, list) for v in labels)
        if several and not all(isinstance(v, list) and len(v) == len(labels[0]) for v in labels):
            raise InvalidArgumentError(f"target {number}: every label must be a list of the same length, or none")
        columns = [list(c) for c in zip(*labels)] if several else [labels]
        texts = [t if isinstance(t, str) else tuple(t) for t in target.texts] if target.texts is not None else None
        data = labelled(texts if texts is not None else [""] * rows, columns, target.task)
        check_labels(data.labels, data.task, rows)
        x = None
        if target.embeddings is not None:
            dim = index.manifest["dim"]
            bad = next((i for i, row in enumerate(target.embeddings) if len(row) != dim), None)
            if bad is not None:
                raise InvalidArgumentError(f"target {number}: embedding {bad} has {len(target.embeddings[bad])} "
                                           f"values; this index needs {dim}")
            x = np.asarray(target.embeddings, dtype=np.float32).reshape(rows, dim)
        else:
            check_size(rows)
        return texts, x, data


def _query_thread(threads: int) -> None:
    """Start of each query thread: how many threads its numba and FAISS kernels use (both
    settings are per calling thread)."""
    if threads:
        import faiss
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        faiss.omp_set_num_threads(threads)


def _warm(index: SourceIndex) -> None:
    """Pay the first-query costs now: the model, the FAISS files, the compiled kernels.

    On a query thread, never the main one: once numba's OpenMP kernels had run on the main
    thread, every query from another thread made OpenBLAS print "Detect OpenMP Loop" (thousands
    of lines for one query)."""
    index.prefilter()
    index.embedder.embed(["warm up the model", "and its tokenizer"])
    if len(index):
        x = np.random.default_rng(0).standard_normal((64, index.manifest["dim"])).astype(np.float32)
        index.rank_embeddings(x, np.arange(64) % 2, "classification", top=1)


# ---- HTTP --------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Only 'localhost' and loopback addresses count; any other name may resolve elsewhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token: rankings and the pool are the
    operator's data, and a query costs CPU."""
    if not is_loopback(host) and not token:
        raise InvalidArgumentError(f"binding to {host} exposes the service beyond this machine: set a token "
                                   f"(--token or ESM_INDEX_TOKEN), which clients send as 'Authorization: Bearer'")


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split()), "type": kind}, status_code=status)


class Guard:
    """ASGI middleware in front of everything: the token, then the body size. The body is
    read here, up to the limit, so an oversized or chunked upload is refused without ever
    being parsed, and a client gone mid-upload ends the request quietly."""

    def __init__(self, app, token: str | None, max_body: int) -> None:
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return await error_response(401, "a valid token is required ('Authorization: Bearer TOKEN')",
                                            "AuthenticationError")(scope, receive, send)
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nothing to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                return await self._too_large(scope, receive, send)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        mb = self.max_body / 2 ** 20
        await error_response(413, f"request body over the {mb:g} MiB limit (send fewer targets or rows per "
                                  f"request)", "PayloadTooLarge")(scope, receive, send)


def make_app(service: Service, token: str | None = None) -> FastAPI:
    """The FastAPI app over ``service``, behind the ``Guard``; ``token`` (when set) is
    required on every path but ``/health``."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()  # after uvicorn has drained the requests in flight
        log.warning("stopped; indexes closed")

    app = FastAPI(title="esm-index", version=_version(), lifespan=lifespan,
                  description="Rank source datasets for intermediate-task transfer with ESM-LogME.",
                  responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                             413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                                  "MalformedRequest")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(422, f"{where}: {first['msg']}" if where else first["msg"], "InvalidArgumentError")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "HTTPError")

    @app.exception_handler(EsmIndexError)
    async def bad_input(request: Request, exc: EsmIndexError) -> JSONResponse:
        return error_response(getattr(exc, "http_status", 400), str(exc), exc.__class__.__name__)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the server's log (as text: the CLI's log handler prints messages only)
        log.error("internal error on %s:\n%s", request.url.path,
                  "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return error_response(500, f"internal error ({exc.__class__.__name__}); see the server log", "InternalError")

    @app.get("/health")
    def health() -> dict:
        """Liveness only: it needs no token, so it names nothing (``/indexes`` does)."""
        return {"status": "ok", "uptime_s": round(time.time() - service.started, 1)}

    @app.get("/indexes")
    def indexes() -> dict:
        return {"indexes": [service.info(name) for name in service.indexes]}

    @app.get("/indexes/{name}/sources")
    def sources(name: str) -> dict:
        """The sources of a served index (by name or folder; ``_``: the first served)."""
        index = service.indexes[service.lookup(None if name == "_" else name)]
        return {"sources": [{k: v for k, v in s.items() if k not in ("fit", "finetune")} for s in index.sources()]}

    @app.post("/rank", response_model=RankResponse)
    def rank(req: RankRequest) -> JSONResponse:
        rankings = service.rank(req)
        return JSONResponse({"rankings": [r.to_dict() for r in rankings]})

    app.add_middleware(Guard, token=token, max_body=int(service.limits.max_body_mb * 2 ** 20))
    return app


def _version() -> str:
    from . import __version__

    return __version__


def serve(folders: dict[str, Path], host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          limits: Limits = Limits(), warm: bool = True) -> None:
    """Check the binding, warm the indexes, then answer until SIGTERM / SIGINT (uvicorn
    stops accepting, lets requests in flight finish for up to 30 s, then the lifespan
    closes the indexes)."""
    import uvicorn

    check_bind(host, token)
    t0 = time.perf_counter()
    service = Service(folders, limits, warm)
    app = make_app(service, token)
    log.warning("%d index(es) open and warm in %.1f s; serving http://%s:%d (pid %d)",
                len(folders), time.perf_counter() - t0, host, port, os.getpid())
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                  timeout_graceful_shutdown=30)).run()

