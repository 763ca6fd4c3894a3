"""What a query takes and returns: ``Query`` (its options), ``Filters``, ``Result`` and ``Ranking``.

They live apart from index.py because the HTTP client (client.py) builds the same types:
this module imports nothing heavy (no numpy, no torch), so ``esm-index rank --server``
starts in a fraction of a second and ``Client.rank`` returns what ``SourceIndex.rank`` does.

A query passes the pool through named stages (query.py runs them in this order), and each
stage's score is reported under the stage's name:

    faiss        the local linear score over the whole pool (pools larger than ``candidates``)
    approximate  LogME on the target's top directions, from summaries     -> best ``refine``
    refining     LogME on the target's top directions, from full maps     -> best ``shortlist``
    exact        ESM-LogME, the paper's score (``Result.esm_logme``)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

DEFAULT_SHORTLIST = 32
"""Sources scored exactly after the prefilter (prefilter.py explains the stages)."""

METHODS = ("combined", "esm-logme", "domain")
"""How the scored sources are ordered (domain.py): ESM-LogME plus domain similarity (the
default), the paper's ESM-LogME alone, or domain similarity alone (a baseline)."""
DEFAULT_METHOD = "combined"


@dataclass(frozen=True)
class Filters:
    """Metadata filters; a source passes when every given field matches."""

    task_type: str | None = None
    language: str | None = None
    tags: Sequence[str] = ()
    min_size: int | None = None

    def __bool__(self) -> bool:
        return bool(self.task_type or self.language or self.tags or self.min_size)

    def describe(self) -> str:
        given = {"task type": self.task_type, "language": self.language,
                 "tags": ", ".join(self.tags), "min size": self.min_size}
        return "; ".join(f"{k} {v}" for k, v in given.items() if v)

    def accepts(self, meta: dict) -> bool:
        return ((not self.task_type or meta.get("task_type") == self.task_type)
                and (not self.language or meta.get("language") == self.language)
                and all(t in meta.get("tags", []) for t in self.tags)
                and (not self.min_size or (meta.get("num_examples") or 0) >= self.min_size))


@dataclass(frozen=True, kw_only=True)
class Query:
    """The options of one ranking. ``top``: results returned; ``shortlist``: sources the
    exact stage scores after the prefilter (None: every source); ``candidates`` and
    ``refine``: sources the FAISS and approximate stages pass on (None: ``prefilter.plan``
    by pool size); ``exact``: score every source exactly; ``filters``: metadata filters;
    ``method``: what orders the results (domain.py)."""

    top: int = 10
    shortlist: int | None = DEFAULT_SHORTLIST
    candidates: int | None = None
    refine: int | None = None
    exact: bool = False
    filters: Filters | None = None
    method: str = DEFAULT_METHOD


@dataclass(frozen=True)
class Result:
    """One ranked source. ``score`` is what the ranking's method orders by (None for a
    source without a domain vector, ranked by domain alone); ``esm_logme`` is the exact
    score and ``domain_similarity`` the cosine of mean embeddings (None without a domain
    vector). The stage scores are None where the source did not pass through that stage
    (``--exact``, a pool no larger than the shortlist, or a source added as a nearest domain)."""

    rank: int
    source: str
    score: float | None
    esm_logme: float
    domain_similarity: float | None = None
    faiss_score: float | None = None
    approximate_score: float | None = None
    refining_score: float | None = None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("esm_logme", data.get("score"))  # a server of an older version sends score only
        return cls(**values)


@dataclass
class Ranking:
    """Best source first (``Result``s). ``timings`` are seconds per stage; ``target`` says
    what was scored (examples, task, classes); ``warnings`` are reasons to trust the scores
    less; ``method`` what ordered them."""

    results: list[Result]
    pool_size: int
    timings: dict = field(default_factory=dict)
    target: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    method: str = DEFAULT_METHOD

    def to_dict(self) -> dict:
        """Plain JSON: what ``--json`` prints and the server sends."""
        return {"method": self.method, "results": [r.to_dict() for r in self.results], "pool_size": self.pool_size,
                "target": self.target, "warnings": self.warnings, "timings": self.timings}

    @classmethod
    def from_dict(cls, data: dict) -> "Ranking":
        """The inverse of ``to_dict`` (a ranking sent over HTTP)."""
        return cls([Result.from_dict(r) for r in data["results"]], int(data["pool_size"]),
                   dict(data.get("timings") or {}), dict(data.get("target") or {}),
                   list(data.get("warnings") or []), str(data.get("method") or DEFAULT_METHOD))
