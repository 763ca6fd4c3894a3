"""A pool split into shards: ``ShardedIndex``, the ``SourceIndex`` API over several index folders.

A sharded index is a folder holding ``shards.json`` and its shards, each a plain index
folder (store.lmdb + FAISS files) that ``SourceIndex`` opens on its own:

    pool/shards.json      {"format": "esm-index shards", "version": 1, "shards": ["shard-0", ...],
                           "assignment": "blake2b-64 of the name mod shards", "embedding": ..., "dim": ...}
    pool/shard-0/ ...     one normal index per shard

Why shards: one machine's memory, disk and cores bound one index. Each shard can be queried
where it lives (ray_shards.py runs one Ray actor per shard; without Ray they run here, one
after another), and a query costs the driver only what the shards send back.

A query runs every stage up to and including the exact rerank on each shard, locally, and
the driver orders the union of what the shards scored (shard_query.py), so the merge is
exact. In exact mode (or whenever each shard's shortlist covers the shard) a sharded query
scores the same sources as the unsharded one and gives the same ranking. With the
prefilter, each shard passes its own shortlist on, so more sources are scored exactly than
in one index (the union of the shards' shortlists), and the top can differ from the
unsharded prefiltered query's wherever either prefilter misses a source of the exact top.

A source lives in exactly one shard, chosen by a stable hash of its name (``shard_of``), so
an add, a removal or a lookup touches one shard and a name cannot be in two.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from . import query as query_path
from .checks import check_labels, check_size
from .errors import IndexStoreError, InvalidArgumentError, ModelMismatchError, NoSourcesError, SourceExistsError
from .esm import ESM
from .finetune import POOL_RECIPE, FinetuneConfig, describe_recipe, pool_recipe
from .index import SourceIndex
from .results import Query, Ranking
from .shard_query import merge, score_shard
from .store import NewSource, Store

MANIFEST = "shards.json"
FORMAT = "esm-index shards"
ASSIGNMENT = "blake2b-64 of the name mod shards"
COPY_BATCH = 256  # sources copied per transaction by ``split``: bounded memory for any pool


def is_sharded(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a sharded index (it holds a shard manifest)."""
    return (Path(folder) / MANIFEST).is_file()


def shard_of(name: str, shards: int) -> int:
    """The shard that holds source ``name``: a hash that is the same in every process and
    on every machine (Python's ``hash`` of a string is salted per process)."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def read_manifest(folder: Path) -> list[Path]:
    """The shard folders a manifest lists; relative paths only, so the folder can move."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IndexStoreError(f"{folder / MANIFEST}: unreadable shard manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("shards"), list):
        raise IndexStoreError(f"{folder / MANIFEST}: not an esm-index shard manifest")
    if data.get("assignment", ASSIGNMENT) != ASSIGNMENT:
        raise IndexStoreError(f"{folder / MANIFEST}: unknown shard assignment {data['assignment']!r}")
    names = data["shards"]
    if not names or not all(isinstance(n, str) and n and not Path(n).is_absolute() for n in names):
        raise IndexStoreError(f"{folder / MANIFEST}: 'shards' must list relative shard folders")
    return [folder / n for n in names]


def _shape(index: SourceIndex) -> dict:
    """What every shard must share for their scores to compare: base model, pooling, dims."""
    m = index.manifest
    return {"embedding": m["embedding"], "dim": m["dim"], "out_dim": m["out_dim"]}


def check_compatible(shards: Sequence[SourceIndex]) -> None:
    """Raise ``ModelMismatchError`` unless every shard has the first one's base model,
    embedding spec and dimensions (scores of different base models do not compare)."""
    first = _shape(shards[0])
    for shard in shards[1:]:
        if _shape(shard) != first:
            raise ModelMismatchError(f"shard {shard.folder} is for {_shape(shard)}, shard {shards[0].folder} for "
                                     f"{first}: every shard must share the base model, embedding and dimensions")


# ---- the sharded index -------------------------------------------------------------------------
class ShardedIndex:
    """A pool split into shards (see the module docstring), with ``SourceIndex``'s API.

    ``workers``: 0 scores the shards here, one after another; N > 0 starts N Ray actors, each
    holding every N-th shard (ray_shards.py). None: one actor per shard when ``ray_address``
    is given, else 0. ``ray_address``: a running cluster (``ray start --head`` prints it);
    without one, N > 0 starts a local Ray instance (or joins the one this process started).
    ``threads``: kernel threads per actor (None: the local cores divided among the actors)."""

    def __init__(self, folder: str | os.PathLike, readonly: bool = False, device: str | None = None,
                 model_path: str | os.PathLike | None = None, batch_size: int = 64, workers: int | None = None,
                 ray_address: str | None = None, threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.readonly = readonly
        self.shards: list[SourceIndex] = []
        self._actors = None  # ray_shards.RayShards, started by the first query that needs it
        self.shard_folders = read_manifest(self.folder)
        if workers is not None and workers < 0:
            raise InvalidArgumentError(f"workers must be 0 or more, not {workers}")
        self.workers = workers if workers is not None else (len(self.shard_folders) if ray_address else 0)
        self.ray_address, self.threads = ray_address, threads
        try:
            for f in self.shard_folders:
                self.shards.append(SourceIndex(f, readonly=readonly, device=device, model_path=model_path,
                                               batch_size=batch_size))
            check_compatible(self.shards)
        except BaseException:
            self.close()
            raise
        self.spec, self.device = self.shards[0].spec, self.shards[0].device
        self._device = device

    @property
    def manifest(self) -> dict:
        """The first shard's manifest: base model, embedding and dimensions are every shard's."""
        return self.shards[0].manifest

    # ---- creation --------------------------------------------------------------------------
    @classmethod
    def split(cls, source: str | os.PathLike, out: str | os.PathLike, shards: int,
              progress: Callable[[int], None] | None = None, **options) -> "ShardedIndex":
        """Split the index at ``source`` into ``shards`` new index folders under ``out`` plus
        the manifest, and open the result (``options``: the constructor's). Each shard gets
        the source index's manifest, probe and reference directions, so the stored summaries
        are copied as they are; the ESM bytes are copied in their stored dtype. ``source`` is
        only read."""
        if shards < 1:
            raise InvalidArgumentError(f"shards must be at least 1, not {shards}")
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise InvalidArgumentError(f"{out}: exists and is not an empty folder")
        names = [f"shard-{i}" for i in range(shards)]
        with SourceIndex(source, readonly=True) as parent:
            stores = [_new_shard(parent, out / n) for n in names]
            try:
                _copy_sources(parent.store, stores, progress)
            finally:
                for store in stores:
                    store.close()
            _write_manifest(out, names, parent)
        for n in names:
            with SourceIndex(out / n) as shard:
                shard.rebuild()
        return cls(out, **options)

    def close(self) -> None:
        if self._actors is not None:
            self._actors.close()
            self._actors = None
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def shard_for(self, name: str) -> SourceIndex:
        """The shard that holds (or would hold) source ``name``."""
        return self.shards[shard_of(name, len(self.shards))]

    # ---- embedding (once, on the driver) ---------------------------------------------------
    @property
    def embedder(self):
        return self.shards[0].embedder

    def embed(self, texts: Sequence, progress: bool = False) -> np.ndarray:
        return self.shards[0].embed(texts, progress=progress)

    # ---- adding and removing sources ---------------------------------------------------------
    def check_esm(self, esm: ESM) -> None:
        self.shards[0].check_esm(esm)

    def add_esms(self, items: Iterable[tuple[str, ESM]], batch_size: int = 64,
                 on_batch: Callable[[int], None] | None = None) -> tuple[int, int]:
        """Add (name, ESM) pairs, each to its own shard (``shard_of``); names already present
        are skipped, as ``SourceIndex.add_esms`` does. Returns (added, skipped)."""
        self._writable()
        pending: list[list[tuple[str, ESM]]] = [[] for _ in self.shards]
        added = skipped = 0

        def flush(i: int) -> None:
            nonlocal added, skipped
            if pending[i]:
                a, s = self.shards[i].add_esms(pending[i], batch_size=batch_size, on_batch=on_batch)
                added, skipped = added + a, skipped + s
                pending[i] = []

        for name, esm in items:
            i = shard_of(name, len(self.shards))
            self.shards[i].check_esm(esm)
            pending[i].append((name, esm))
            if len(pending[i]) >= batch_size:
                flush(i)
        for i in range(len(self.shards)):
            flush(i)
        return added, skipped

    def add_esm(self, name: str, esm: ESM) -> bool:
        return self.add_esms([(name, esm)])[0] == 1

    def add_dataset(self, data, name: str, config: FinetuneConfig | None = None, progress: bool = False,
                    meta: dict | None = None, replace: bool = False,
                    announce: Callable[[FinetuneConfig], None] | None = None) -> ESM:
        """``SourceIndex.add_dataset`` on the shard that ``name`` belongs to, with the whole
        pool's recipe by default (not only that shard's)."""
        self._writable()
        return self.shard_for(name).add_dataset(data, name, config or self.pool_recipe() or POOL_RECIPE,
                                                progress=progress, meta=meta, replace=replace, announce=announce)

    def pool_recipe(self, scan: int = 512) -> FinetuneConfig | None:
        """``SourceIndex.pool_recipe`` over all shards: the first ``scan`` sources, spread evenly."""
        per_shard = -(-scan // len(self.shards))
        return pool_recipe(m for shard in self.shards for _, m in islice(shard.store.iter_meta(), per_shard))

    def remove(self, names: Iterable[str]) -> list[str]:
        self._writable()
        by_shard: dict[int, list[str]] = {}
        for name in names:
            by_shard.setdefault(shard_of(name, len(self.shards)), []).append(name)
        return [n for i, group in sorted(by_shard.items()) for n in self.shards[i].remove(group)]

    def _writable(self) -> None:
        if self.readonly:
            raise IndexStoreError(f"{self.folder}: opened read-only")

    # ---- listing, export, upkeep -----------------------------------------------------------
    def sources(self) -> list[dict]:
        """Every source's metadata as ``SourceIndex.sources`` gives it, with its shard's
        folder (ids are per shard)."""
        return [{**s, "shard": f.name} for shard, f in zip(self.shards, self.shard_folders) for s in shard.sources()]

    def get_esm(self, name: str) -> ESM:
        return self.shard_for(name).get_esm(name)

    def export(self, out: str | os.PathLike, force: bool = False) -> int:
        """Every source of every shard as an hfselect ESM folder under ``out`` (one folder,
        as for an unsharded index); ``force`` as for ``SourceIndex.export``."""
        out = Path(out)
        if not force and out.is_dir() and any(out.iterdir()):
            raise InvalidArgumentError(f"{out}: the folder is not empty (force=True, or --force, writes into it)")
        return sum(shard.export(out, force=i > 0 or force) for i, shard in enumerate(self.shards))

    def rebuild(self, reprobe: bool = False) -> None:
        for shard in self.shards:
            shard.rebuild(reprobe)

    def verify(self) -> list[str]:
        """Each shard's problems (prefixed with its folder), and any source in the wrong shard."""
        problems = []
        for i, (shard, f) in enumerate(zip(self.shards, self.shard_folders)):
            problems += [f"{f.name}: {p}" for p in shard.verify()]
            problems += [f"{f.name}: source {m['name']!r} belongs in shard {shard_of(m['name'], len(self.shards))}"
                         for _, m in shard.store.iter_meta() if shard_of(m["name"], len(self.shards)) != i]
        return problems

    def info(self) -> dict:
        """``SourceIndex.info``'s fields over all shards, and each shard's size."""
        parts = [s.info() for s in self.shards]
        first, recipe = parts[0], self.pool_recipe()
        return {"sources": sum(p["sources"] for p in parts), "model": first["model"], "embedding": first["embedding"],
                "dim": first["dim"], "esm_dtype": first["esm_dtype"], "summary_dim": first["summary_dim"],
                "schema_version": first["schema_version"], "generation": sum(p["generation"] for p in parts),
                "lmdb_bytes": sum(p["lmdb_bytes"] for p in parts),
                "prefilter": f"{first['prefilter']} in each of {len(parts)} shards",
                "faiss_bytes": sum(p["faiss_bytes"] for p in parts),
                "shards": {f.name: p["sources"] for f, p in zip(self.shard_folders, parts)},
                "recipe": describe_recipe(recipe) if recipe else None}

    # ---- ranking -----------------------------------------------------------------------------
    def rank(self, texts: Sequence, labels, task: str = "classification", *, progress: bool = False,
             **options) -> Ranking:
        """As ``SourceIndex.rank``: the texts are embedded here, once, and the shards get the
        embeddings."""
        query = Query(**options)
        check_labels(labels, task, len(texts))
        check_size(len(texts))
        query_path.check_query(query)
        self._check_filters(query)
        t0 = time.perf_counter()
        x = self.embed(texts, progress=progress)
        ranking = self.rank_embeddings(x, labels, task, **options)
        ranking.timings = {"embed": round(time.perf_counter() - t0 - sum(ranking.timings.values()), 4),
                           **ranking.timings}
        return ranking

    def rank_embeddings(self, x: np.ndarray, labels, task: str = "classification", **options) -> Ranking:
        """As ``SourceIndex.rank_embeddings``, over every shard, merged exactly (``merge``)."""
        query = Query(**options)
        x, labels, about, warnings = query_path.check_input(self.manifest["dim"], x, labels, task, query)
        self._check_filters(query)
        t0 = time.perf_counter()
        if self.workers:
            parts = self._ray().score(x, labels, task, query)
        else:
            parts = [score_shard(shard, x, labels, task, query) for shard in self.shards]
        t1 = time.perf_counter()
        prefiltered = [p.pool_size for p in parts if np.isfinite(p.stages["approximate"]).any()]
        warned = query_path.prefilter_warning(len(x), bool(prefiltered), max(prefiltered, default=0))
        ranking = merge(parts, query, about, warnings + warned)
        ranking.timings = {"shards": round(t1 - t0, 4), "merge": round(time.perf_counter() - t1, 4)}
        return ranking

    def prefilter(self):
        """Each shard has its own prefilter; there is no single one to hand out."""
        raise InvalidArgumentError(f"{self.folder} is a sharded index, with one prefilter per shard: "
                                   f"open a shard folder ({self.shard_folders[0]}) for what needs one")

    def _check_filters(self, query: Query) -> None:
        filters = query.filters
        if filters and not any(filters.accepts(m) for s in self.shards for _, m in s.store.iter_meta()):
            raise NoSourcesError(f"no source of the index matches the filters ({filters.describe()})")

    def _ray(self):
        if self._actors is None:
            from .ray_shards import RayShards

            self._actors = RayShards([str(f.resolve()) for f in self.shard_folders], self.workers,
                                     self.ray_address, self._device, self.threads)
        return self._actors


def open_index(folder: str | os.PathLike, workers: int | None = None, ray_address: str | None = None,
               **options) -> SourceIndex | ShardedIndex:
    """A ``ShardedIndex`` when ``folder`` holds a shard manifest, else a ``SourceIndex``
    (``options``: the constructor's; ``workers`` and ``ray_address`` only mean something for
    a sharded index, and are refused for a plain one rather than ignored)."""
    if is_sharded(folder):
        return ShardedIndex(folder, workers=workers, ray_address=ray_address, **options)
    if workers or ray_address:
        raise InvalidArgumentError(f"{folder} is not a sharded index: workers and a Ray address apply to "
                                   f"sharded indexes only ('esm-index shard' makes one)")
    return SourceIndex(folder, **options)


# ---- splitting -------------------------------------------------------------------------------
def _new_shard(parent: SourceIndex, folder: Path) -> Store:
    """An empty index folder with the parent's manifest, probe and reference directions."""
    manifest = {k: v for k, v in parent.manifest.items()
                if k not in ("schema_version", "probe_shape", "reference_shape")}
    if manifest.get("model_path"):  # kept relative to the index folder (index.py), so re-based here
        model = (parent.folder / manifest["model_path"]).resolve()
        manifest["model_path"] = os.path.relpath(model, folder.resolve())
    folder.mkdir(parents=True)
    store = Store(folder, create=True)
    store.init(manifest, parent.store.probe(), parent.store.probe("reference"))
    return store


def _copy_sources(parent: Store, stores: list[Store], progress: Callable[[int], None] | None) -> None:
    """Every source of ``parent`` into its shard (``shard_of``), ``COPY_BATCH`` at a time."""
    ids = parent.ids()
    for start in range(0, len(ids), COPY_BATCH):
        found, weights, biases = parent.esms(ids[start:start + COPY_BATCH])
        _, summaries = parent.summaries(found)
        metas = parent.metas(found)
        by_shard: dict[int, list[NewSource]] = {}
        for w, b, meta, summary in zip(weights, biases, metas, summaries):
            name = meta.pop("name")
            by_shard.setdefault(shard_of(name, len(stores)), []).append(NewSource(name, w, b, meta, summary))
        for i, sources in by_shard.items():
            if None in stores[i].add(sources):
                raise SourceExistsError(f"{stores[i].path.parent}: a source name repeats while splitting")
        if progress:
            progress(len(found))


def _write_manifest(out: Path, names: list[str], parent: SourceIndex) -> None:
    m = parent.manifest
    manifest = {"format": FORMAT, "version": 1, "shards": names, "assignment": ASSIGNMENT,
                "embedding": m["embedding"], "dim": m["dim"], "out_dim": m["out_dim"],
                "split_from": str(Path(parent.folder).resolve()), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
