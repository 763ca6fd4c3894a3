"""What a query takes and returns: ``Filters``, ``Ranking`` and the default shortlist.

They live apart from index.py because the HTTP client (client.py) builds the same types:
this module imports nothing heavy (no numpy, no torch), so ``esm-index rank --server``
starts in a fraction of a second and ``Client.rank`` returns what ``SourceIndex.rank`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

DEFAULT_SHORTLIST = 32
"""Sources scored exactly after the prefilter (prefilter.py explains the stages)."""

METHODS = ("combined", "esm-logme", "domain")
"""How the scored sources are ordered (domain.py): ESM-LogME plus domain similarity (the
default), the paper's ESM-LogME alone, or domain similarity alone (a baseline)."""
DEFAULT_METHOD = "combined"


@dataclass
class Ranking:
    """Best source first. Each result has ``score`` (what ``method`` orders by), its parts
    ``esm_logme`` and ``domain_similarity`` (None for a source without a domain vector), the
    prefilter's stage scores and ``meta``. ``timings`` are seconds per stage; ``target`` says
    what was scored (examples, task, classes); ``warnings`` are reasons to trust the scores less."""

    results: list[dict]
    pool_size: int
    timings: dict = field(default_factory=dict)
    target: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    method: str = DEFAULT_METHOD

    def to_dict(self) -> dict:
        return {"method": self.method, "results": self.results, "pool_size": self.pool_size,
                "target": self.target, "warnings": self.warnings, "timings": self.timings}

    @classmethod
    def from_dict(cls, data: dict) -> "Ranking":
        """The inverse of ``to_dict`` (a ranking sent over HTTP)."""
        return cls(list(data["results"]), int(data["pool_size"]), dict(data.get("timings") or {}),
                   dict(data.get("target") or {}), list(data.get("warnings") or []),
                   str(data.get("method") or DEFAULT_METHOD))


@dataclass
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
