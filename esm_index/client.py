"""``Client``: rank against a running ``esm-index serve`` as you would against a ``SourceIndex``.

``Client(url).rank(texts, labels, task, top=..., ...)`` has ``SourceIndex.rank``'s signature and returns
the same ``Ranking``, so an AutoML system switches between in-process and remote ranking by
changing one constructor. This module imports only the standard library and the light
modules results.py, tables.py and errors.py (never numpy or torch): the CLI's ``--server``
path starts in well under a second, and the server keeps the model and indexes warm.

A 4xx answer is raised as the typed error the server names (``InvalidTargetError``...), so a
caller catches the same exceptions as in-process; a missing or broken server is a
``ServiceError``.
"""

from __future__ import annotations

import http.client
import json
import os
from dataclasses import asdict
from typing import Sequence
from urllib.parse import urlsplit

from . import errors
from .results import Query, Ranking

SERVER_ENV = "ESM_INDEX_SERVER"
TOKEN_ENV = "ESM_INDEX_TOKEN"


class ServiceError(errors.EsmIndexError):
    """The query service is unreachable, or answered something that is not a result."""


class Client:
    """HTTP client of ``esm-index serve``. ``index`` picks a served index by name or by the
    folder it was served from (default: the server's first). Safe from several threads:
    each call opens its own connection."""

    def __init__(self, url: str | None = None, index: str | None = None, token: str | None = None,
                 timeout: float = 600.0) -> None:
        url = url or os.environ.get(SERVER_ENV)
        if not url:
            raise errors.InvalidArgumentError(f"no server URL given (pass one, or set {SERVER_ENV})")
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise errors.InvalidArgumentError(f"{url!r} is not an http(s) URL")
        self.url, self.index, self.timeout = url, index, timeout
        self._parts = parts
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)

    # ---- the ranking calls (SourceIndex's signatures) -----------------------------------
    def rank(self, texts: Sequence, labels, task: str | None = "classification", *, progress: bool = False,
             **options) -> Ranking:
        """Rank for a target of texts and labels; the server embeds the texts (and caches
        them). ``options`` are ``results.Query``'s, as for ``SourceIndex.rank``. ``task=None``
        lets the server guess it, as the CLI does for a file; labels that are not class ids
        are numbered in sorted order, as in a file. ``progress`` is accepted for signature
        compatibility and ignored."""
        target = {"texts": [t if isinstance(t, str) else list(t) for t in texts], "labels": _plain(labels),
                  "task": task}
        return self.rank_many([target], **options)[0]

    def rank_embeddings(self, x, labels, task: str | None = "classification", **options) -> Ranking:
        """Rank from base-model embeddings (n, d) of the target (a numpy array or lists)."""
        target = {"embeddings": _plain(x), "labels": _plain(labels), "task": task}
        return self.rank_many([target], **options)[0]

    def rank_many(self, targets: Sequence[dict], **options) -> list[Ranking]:
        """Several targets in one request (the AutoML case), each a dict with ``texts`` or
        ``embeddings``, ``labels`` and optionally ``task``; one ``Ranking`` per target, in
        order. Every target is checked before any is ranked."""
        query = asdict(Query(**options))
        body: dict = {"targets": [{k: _plain(v) for k, v in t.items()} for t in targets], **query}
        if self.index is not None:
            body["index"] = self.index
        return [Ranking.from_dict(r) for r in self.request("POST", "/rank", body)["rankings"]]

    # ---- the rest of the API ----------------------------------------------------------------
    def health(self) -> dict:
        return self.request("GET", "/health")

    def indexes(self) -> list[dict]:
        """Every served index with its manifest summary (``esm-index info``'s fields)."""
        return self.request("GET", "/indexes")["indexes"]

    def sources(self, index: str | None = None) -> list[dict]:
        return self.request("GET", f"/indexes/{_name(index or self.index or '_')}/sources")["sources"]

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One call; a JSON answer, or the typed error the server names."""
        parts = self._parts
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(parts.hostname, parts.port,
                                                                            timeout=self.timeout)
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=self.timeout)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            try:
                data = json.dumps(body, allow_nan=False).encode()
            except ValueError:  # NaN or infinity: JSON has no such numbers
                raise errors.InvalidTargetError("the target holds NaN or infinite values") from None
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, parts.path.rstrip("/") + path, body=data, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ServiceError(f"cannot reach the esm-index server at {self.url} ({exc.__class__.__name__}: "
                               f"{exc}); start one with 'esm-index serve'") from None
        finally:
            conn.close()
        try:
            answer = json.loads(payload)
        except ValueError:
            raise ServiceError(f"{self.url} answered HTTP {response.status} without JSON") from None
        if response.status >= 400:
            kind = getattr(errors, str(answer.get("type")), None) if isinstance(answer, dict) else None
            if not (isinstance(kind, type) and issubclass(kind, errors.EsmIndexError)):
                kind = ServiceError
            message = answer.get("error") if isinstance(answer, dict) else None
            raise kind(message or f"HTTP {response.status}")
        return answer


def _plain(value):
    """JSON-ready: numpy arrays and scalars become lists and numbers (without importing numpy)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (str, int, float)) for v in value):  # a row of plain values: no recursion
            return list(value)
        return [_plain(v) for v in value]
    return value


def _name(index: str) -> str:
    from urllib.parse import quote

    return quote(index, safe="")
