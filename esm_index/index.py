"""``SourceIndex``: the Python API that ties embedding, store, prefilter and scorer together.

A query reads straight down one path (query.py, one named step per stage):

    texts --embed--> X --> target statistics --> faiss --> approximate --> refining
          --> (nearest domains) --> exact ESM-LogME --> combine --> ranking

An index is a folder: ``store.lmdb`` (source of truth, see store.py) plus derived
``prefilter.faiss`` / ``domain.faiss`` / ``prefilter.json`` that ``rebuild()`` can always
regenerate (prefilter.py). This module only orchestrates: the numerics live in logme.py and
summary.py, the query's stages in query.py, the FAISS files in prefilter.py, the bytes in store.py.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace as with_fields
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from . import query as query_path
from .checks import check_labels, check_positive, check_size, dense_classes
from .data import LabelledData
from .domain import DOMAIN_KEY
from .embed import (DEFAULT_MODEL_NAME, Embedder, EmbeddingSpec, cached_embeddings, checked_device, identify_model,
                    index_model_folder, resolve_model)
from .encoding import get_encoding
from .errors import (EsmIndexError, IndexStoreError, InvalidArgumentError, ModelMismatchError, NoSourcesError,
                     SourceExistsError)
from .esm import ESM
from .finetune import FIT_TEXTS, POOL_RECIPE, FinetuneConfig, describe_recipe, finetune_and_fit, pool_recipe
from .logme import one_blas_thread
from .prefilter import Prefilter, PrefilterFiles
from .results import Query, Ranking  # apart, so client.py builds them without numpy
from .store import NewSource, Store
from .summary import DEFAULT_PROBE_DIM, join_probe, make_probe, summarize, summary_dim

REFERENCE_TEXTS = Path(__file__).with_name("reference_texts.txt")
CACHE_DIR = Path(os.environ.get("ESM_INDEX_CACHE", Path.home() / ".cache" / "esm-index"))
log = logging.getLogger(__name__)  # progress lines for slow steps; the CLI prints them on stderr


class SourceIndex:
    """A persistent pool of sources (ESMs + metadata) that ranks them for a target."""

    def __init__(self, folder: str | os.PathLike, readonly: bool = False, device: str | None = None,
                 model_path: str | os.PathLike | None = None, batch_size: int = 64) -> None:
        self.folder = Path(folder)
        self.readonly = readonly
        self.store = Store(self.folder, readonly=readonly)
        self.spec = EmbeddingSpec(**self.manifest["embedding"])
        self.device = None if device is None else checked_device(device)  # before any slow step; None: the best
        self._model_path = model_path
        self._batch_size = batch_size
        self._lock = threading.RLock()
        self._embedder = None
        self.prefilters = PrefilterFiles(self.folder, self.store, readonly)

    @property
    def manifest(self) -> dict:
        return self.store.manifest

    @property
    def probe(self) -> np.ndarray:
        """The prefilter's probe U, on which the summaries are computed (summary.py)."""
        return self.prefilters.probe

    # ---- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: str | os.PathLike, model_path: str | os.PathLike | None = None,
               spec: EmbeddingSpec | None = None, esm_dtype: str = "float16", probe_dim: int = DEFAULT_PROBE_DIM,
               reference_texts: Sequence[str] | None = None, device: str | None = None,
               batch_size: int = 64) -> "SourceIndex":
        """Make a new, empty index for one base model and pooling, storing ESMs in the
        encoding ``esm_dtype`` (float16, float32 or float16-factor: encoding.py). The prefilter's probe is
        computed here from reference texts embedded with that model. ``model_path``: a model
        folder or a hub name in the local cache (default: the packaged MiniLM). Without a
        ``spec.model_name``, the model is identified (``embed.identify_model``), so that ESMs
        made for it by its hub name fit; the folder's name is the fallback."""
        get_encoding(esm_dtype)  # an unknown encoding is refused before the model loads
        folder = Path(folder)
        if (folder / "store.lmdb").exists():
            raise IndexStoreError(f"{folder}: an index exists there already")
        model_path = resolve_model(model_path) if model_path is not None else None
        spec = spec or EmbeddingSpec(model_name="" if model_path else DEFAULT_MODEL_NAME)
        embedder = Embedder(model_path, spec, device=device, batch_size=batch_size)
        identified = identify_model(embedder) if model_path is not None else DEFAULT_MODEL_NAME
        if not spec.model_name:
            spec = embedder.spec = with_fields(spec, model_name=identified or embedder.model_path.name)
        # portable facts only: a model known to be what its name says is found again by that name;
        # any other folder (a name given by hand proves nothing) is kept relative to the index
        relative = None if identified == spec.model_name else os.path.relpath(embedder.model_path.resolve(),
                                                                               folder.resolve())
        texts = list(reference_texts) if reference_texts else REFERENCE_TEXTS.read_text(encoding="utf-8").splitlines()
        dim = embedder.dim
        probe_dim = min(probe_dim, dim + 1, len(texts))
        reference = make_probe(embedder.embed(texts), probe_dim)
        probe = join_probe(reference, None, probe_dim)
        folder.mkdir(parents=True, exist_ok=True)
        store = Store(folder, create=True)
        store.init({"embedding": spec.to_dict(), "model_path": relative, "dim": dim,
                    "out_dim": dim, "esm_dtype": esm_dtype, "summary_dim": summary_dim(probe_dim),
                    "summary": f"upper triangle of U^T [W,b]^T [W,b] U; U: {probe_dim} directions, half "
                               f"principal directions of [X_ref, 1] ({len(texts)} reference texts), half "
                               f"directions of between-source variation of [W,b]^T [W,b]",
                    "probe_pool_fitted": False, "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
                   probe, reference)
        store.close()
        index = cls(folder, device=device, model_path=model_path, batch_size=batch_size)
        index._embedder = embedder
        index.rebuild()
        return index

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "SourceIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.store.count()

    # ---- the embedder --------------------------------------------------------------------
    @property
    def embedder(self):
        """The base model, loaded on first use (a query with cached embeddings never loads it)."""
        with self._lock:
            if self._embedder is None:
                path = (resolve_model(self._model_path) if self._model_path
                        else index_model_folder(self.manifest, self.folder))
                self._embedder = Embedder(path, self.spec, device=self.device, batch_size=self._batch_size)
                if self._embedder.dim != self.manifest["dim"]:
                    raise ModelMismatchError(f"model {path} gives {self._embedder.dim}-d embeddings, "
                                             f"the index holds {self.manifest['dim']}-d ESMs")
            return self._embedder

    def embed(self, texts: Sequence, progress: bool = False) -> np.ndarray:
        """Embeddings of ``texts``, cached on disk by content hash + embedding spec."""
        return cached_embeddings(CACHE_DIR / "embeddings", self.spec, texts,
                                 lambda: self.embedder.embed(texts, progress=progress))

    # ---- adding and removing sources -----------------------------------------------------
    def check_esm(self, esm: ESM) -> None:
        """Raise unless ``esm`` fits this index's base model and dimension."""
        esm.validate(self.manifest["dim"])
        if esm.out_dim != self.manifest["out_dim"]:
            raise ModelMismatchError(f"ESM maps to {esm.out_dim} dimensions, "
                                     f"the index holds {self.manifest['out_dim']}")
        base = esm.meta.get("base_model_name")
        if base and base != self.spec.model_name:
            raise ModelMismatchError(f"ESM was made for base model {base!r}, "
                                     f"this index is for {self.spec.model_name!r}")

    def add_esms(self, items: Iterable[tuple[str, ESM]], batch_size: int = 64,
                 on_batch: Callable[[int], None] | None = None) -> tuple[int, int]:
        """Add (name, ESM) pairs, committing every ``batch_size``. Names already present are
        skipped, so a re-run after a crash resumes. Returns (added, skipped)."""
        self._writable()
        added = skipped = 0
        batch: list[tuple[str, ESM]] = []

        def flush() -> None:
            nonlocal added, skipped
            if not batch:
                return
            weights, biases = np.stack([e.weight for _, e in batch]), np.stack([e.bias for _, e in batch])
            summaries = summarize(weights, biases, self.probe)
            meta = [_source_meta(e) for _, e in batch]
            with one_blas_thread():  # one limiter for a batch, not one per map the encoding factors
                ids = self.store.add(NewSource(n, e.weight, e.bias, m, s)
                                     for (n, e), m, s in zip(batch, meta, summaries))
            added += sum(i is not None for i in ids)
            skipped += sum(i is None for i in ids)
            if on_batch:
                on_batch(len(batch))
            batch.clear()

        for name, esm in items:
            self.check_esm(esm)
            batch.append((name, esm))
            if len(batch) >= batch_size:
                flush()
        flush()
        return added, skipped

    def add_esm(self, name: str, esm: ESM) -> bool:
        return self.add_esms([(name, esm)])[0] == 1

    def add_dataset(self, data: LabelledData, name: str, config: FinetuneConfig | None = None, progress: bool = False,
                    meta: dict | None = None, replace: bool = False,
                    announce: Callable[[FinetuneConfig], None] | None = None) -> ESM:
        """Fine-tune the base model on ``data``, fit its ESM and add it (slow: minutes).
        ``meta`` (language, tags, provenance...) is stored with the source. Everything that
        would make the work useless (a name already taken unless ``replace``, data a ranking
        would refuse, a config that trains nothing) is refused before fine-tuning starts.
        ``config`` defaults to the pool's own recipe (``pool_recipe``), else POOL_RECIPE;
        ``announce`` is called with it once the inputs are accepted, before fine-tuning."""
        self._writable()
        if not replace and self.store.id_of(name) is not None:
            raise SourceExistsError(f"a source named {name!r} is in the index already "
                                    f"(replace=True, or --replace, overwrites it)")
        check_labels(data.labels, data.task, len(data.texts))
        check_size(len(data), what="data set")
        config = config or self.pool_recipe() or POOL_RECIPE
        check_positive(**{f: getattr(config, f, None) for f in ("max_examples", "fit_examples", "epochs",
                                                                "max_steps", "batch_size")})
        if not data.regression:
            data = with_fields(data, labels=dense_classes(data.labels))
        if announce:
            announce(config)
        embedder = self.embedder
        log.info("fine-tuning the base model on %d examples of %s (at most %d, %d epochs), then fitting its ESM; "
                 "minutes on a CPU", len(data), name, config.max_examples, config.epochs)
        # fitted on other kinds of text too, as the shipped pool's maps are (finetune.esm_from_models)
        other = FIT_TEXTS.read_text(encoding="utf-8").splitlines()
        # their base embeddings are the same for every source added: cached after the first
        esm = finetune_and_fit(embedder, data, config, progress=progress, other_texts=other,
                               other_base=self.embed(other))[0]
        esm.meta.update({"task_id": name, "num_examples": len(data), "label_names": data.label_names, **(meta or {})})
        if replace:  # only now that the new map exists
            self.store.remove([name])
        self.add_esm(name, esm)
        return esm

    def pool_recipe(self, scan: int = 512) -> FinetuneConfig | None:
        """The fine-tuning recipe the pool's sources were made with (``finetune.pool_recipe``),
        read from the metadata of the first ``scan`` sources, so that a million-source pool is
        not read through to add one; None for a pool with no such record (hfselect's ESMs)
        or with mixed recipes. ``add_dataset`` fine-tunes with it by default: LogME rewards
        a source that moved further whatever the target, so one pool wants one recipe."""
        return pool_recipe(m for _, m in islice(self.store.iter_meta(), scan))

    def remove(self, names: Iterable[str]) -> list[str]:
        self._writable()
        return self.store.remove(names)

    def _writable(self) -> None:
        if self.readonly:
            raise IndexStoreError(f"{self.folder}: opened read-only")

    # ---- listing and export --------------------------------------------------------------
    def sources(self) -> list[dict]:
        """Every source's id and metadata; the 384-float domain vector is replaced by whether
        there is one (``get_esm`` and ``export`` keep it)."""
        return [{"id": i, **{k: v for k, v in m.items() if k != DOMAIN_KEY}, "has_domain_vector": DOMAIN_KEY in m}
                for i, m in self.store.iter_meta()]

    def get_esm(self, name: str) -> ESM:
        sid = self.store.id_of(name)
        if sid is None:
            raise EsmIndexError(f"no source named {name!r}")
        _, w, b = self.store.esms([sid])
        meta = self.store.metas([sid])[0]
        return ESM(w[0], b[0], {k: v for k, v in meta.items() if k != "name"})

    def export(self, out: str | os.PathLike, force: bool = False) -> int:
        """Write every source as an hfselect ESM folder under ``out``. An existing file, or a
        folder with anything in it, is refused unless ``force`` (then same-named ESM folders
        are overwritten and other files are left alone)."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise InvalidArgumentError(f"{out}: exists and is not a folder")
        if not force and out.is_dir() and any(out.iterdir()):
            raise InvalidArgumentError(f"{out}: the folder is not empty (force=True, or --force, writes into it)")
        count = 0
        for _, weights, biases, metas in self.store.iter_esms(metas=True):  # a batch in memory at a time
            for w, b, meta in zip(weights, biases, metas):
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in meta["name"])
                ESM(w, b, {k: v for k, v in meta.items() if k != "name"}).save(out / safe)
                count += 1
        return count

    # ---- the prefilter (its lifecycle: prefilter.PrefilterFiles) -----------------------------
    def rebuild(self, reprobe: bool = False, probe_dim: int | None = None) -> None:
        """Regenerate the FAISS files from LMDB (the only state they hold is derived). The
        first rebuild of a writable index with at least 8 sources (or ``reprobe``) also fits
        the pool half of the probe and recomputes every summary (see summary.py).
        ``probe_dim`` (needs ``reprobe``): the probe's new number of directions, k(k+1)/2
        floats a summary; for measuring whether a pool's summaries need more (BENCHMARKS.md
        section 6: 192 was no better than 128 on the 10k bench pool)."""
        if probe_dim is not None and not reprobe:
            raise InvalidArgumentError("a new probe dimension needs a reprobe")
        self.prefilters.rebuild(reprobe, probe_dim)

    def prefilter(self) -> Prefilter:
        """The ``Prefilter`` current with LMDB; stale or damaged files are rebuilt (in memory
        only when the index is read-only)."""
        return self.prefilters.current()

    def verify(self) -> list[str]:
        """Problems found (empty when clean): LMDB tables agree, weights finite, FAISS
        files present, current and holding exactly the stored sources."""
        return self.store.check() + self.prefilters.problems()

    def info(self) -> dict:
        """What ``esm-index info`` shows: size, model, layout and the files on disk."""
        m = self.manifest
        recipe = self.pool_recipe()
        return {"sources": len(self), "model": m["embedding"]["model_name"], "embedding": m["embedding"],
                "dim": m["dim"], "esm_dtype": m["esm_dtype"], "summary_dim": m["summary_dim"],
                "schema_version": m["schema_version"], "generation": self.store.generation(),
                "lmdb_bytes": self.store.disk_bytes(), **self.prefilters.describe(),
                "recipe": describe_recipe(recipe) if recipe else None}

    # ---- ranking ---------------------------------------------------------------------------
    def rank(self, texts: Sequence, labels, task: str = "classification", *, progress: bool = False,
             **options) -> Ranking:
        """Rank the pool's sources for a target given as texts and labels (class ids, or
        floats for regression). ``options`` are ``results.Query``'s (top, shortlist,
        candidates, refine, exact, filters, method); bad targets and options are refused
        before the (slow) embedding."""
        query = Query(**options)
        check_labels(labels, task, len(texts))
        check_size(len(texts))
        query_path.check_query(query)
        filters = query.filters
        if filters and not any(filters.accepts(m) for _, m in self.store.iter_meta()):  # stops at a match
            raise NoSourcesError(f"no source of the index matches the filters ({filters.describe()})")
        t0 = time.perf_counter()
        x = self.embed(texts, progress=progress)
        ranking = query_path.run(self, x, labels, task, query)
        ranking.timings = {"embed": round(time.perf_counter() - t0 - sum(ranking.timings.values()), 4),
                           **ranking.timings}
        return ranking

    def rank_embeddings(self, x: np.ndarray, labels, task: str = "classification", **options) -> Ranking:
        """Rank from precomputed base-model embeddings (n, d) of the target; ``options`` as
        for ``rank``."""
        return query_path.run(self, x, labels, task, Query(**options))


def _source_meta(esm: ESM) -> dict:
    """What we keep of an ESM's config: everything JSON, plus the fields filters use.
    ``name`` is the source's key in the index, so a descriptive name becomes ``title``."""
    meta = dict(esm.meta)
    if "name" in meta:
        meta.setdefault("title", meta.pop("name"))
    meta.setdefault("task_type", "classification")
    return meta

