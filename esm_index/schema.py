"""The bodies of ``esm-index serve``'s HTTP API (server.py), as pydantic models: what a
request may hold (checked before any work starts: unknown fields, non-finite numbers and
empty target lists are refused with a 4xx) and what a response holds. FastAPI publishes them
as the OpenAPI schema at ``/openapi.json``."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, StrictInt

from .results import DEFAULT_METHOD, DEFAULT_SHORTLIST

Label = Union[StrictInt, FiniteFloat, str, list[FiniteFloat]]


class Target(BaseModel):
    """Texts (a string, or a list of strings for text pairs) or base-model embeddings, and
    labels as a file holds them: class ids are kept, other labels numbered in sorted order,
    a list per example is a multi-output regression. ``task`` null: guessed from the labels."""

    model_config = ConfigDict(extra="forbid")
    texts: list[Union[str, list[str]]] | None = None
    embeddings: list[list[FiniteFloat]] | None = None
    labels: list[Label]
    task: Literal["classification", "regression"] | None = None


class FilterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task_type: str | None = None
    language: str | None = None
    tags: list[str] = []
    min_size: int | None = None


class RankRequest(BaseModel):
    """Options mean what they mean for ``SourceIndex.rank``; ``index``: a served index's
    name or folder (default: the first served)."""

    model_config = ConfigDict(extra="forbid")
    index: str | None = None
    targets: list[Target] = Field(min_length=1)
    top: int = 10
    shortlist: int | None = DEFAULT_SHORTLIST
    candidates: int | None = None
    refine: int | None = None
    exact: bool = False
    filters: FilterSpec | None = None
    method: Literal["combined", "esm-logme", "domain"] = DEFAULT_METHOD  # results.METHODS


class RankingModel(BaseModel):
    method: str
    results: list[dict]
    pool_size: int
    target: dict
    warnings: list[str]
    timings: dict[str, float]


class RankResponse(BaseModel):
    rankings: list[RankingModel]


class ErrorResponse(BaseModel):
    error: str
    type: str
