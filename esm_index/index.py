"""``SourceIndex``: the Python API that ties embedding, store, prefilter and scorer together.

A query reads straight down one path:

    texts --embed--> X --prefilter.shortlist--> FAISS candidates --> approximate stage
          --> refining stage --> exact ESM-LogME (logme.py) --> ranking

An index is a folder: ``store.lmdb`` (source of truth, see store.py) plus derived
``prefilter.faiss`` / ``prefilter.json`` that ``rebuild()`` can always regenerate.
This module is the API hub and only orchestrates: the numerics live in logme.py and
summary.py, the staged search in prefilter.py, the bytes in store.py.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .data import LabelledData
from .embed import DEFAULT_MODEL_NAME, EmbeddingSpec, checked_device
from .checks import check_labels, check_method, check_positive, check_size, check_stages, dense_classes
from .domain import DEFAULT_METHOD, DOMAIN_KEY
from .errors import (EsmIndexError, IndexStoreError, InvalidArgumentError, ModelMismatchError, NoSourcesError,
                     SourceExistsError)
from .esm import ESM
from .results import DEFAULT_SHORTLIST, Filters, Ranking  # apart, so client.py builds them without numpy
from .store import NewSource, Store
from .summary import DEFAULT_PROBE_DIM

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
        self.manifest = self.store.manifest
        self.spec = EmbeddingSpec(**self.manifest["embedding"])
        self._device = None if device is None else checked_device(device)  # before any slow step
        self._model_path = model_path
        self._batch_size = batch_size
        self._lock = threading.RLock()
        self._embedder = None
        self._prefilter = None  # prefilter.Prefilter of the store's current generation
        self.probe = self.store.probe()

    # ---- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: str | os.PathLike, model_path: str | os.PathLike | None = None,
               spec: EmbeddingSpec | None = None, esm_dtype: str = "float16", probe_dim: int = DEFAULT_PROBE_DIM,
               reference_texts: Sequence[str] | None = None, device: str | None = None,
               batch_size: int = 64) -> "SourceIndex":
        """Make a new, empty index for one base model and pooling. The prefilter's probe is
        computed here from reference texts embedded with that model. ``model_path``: a model
        folder or a hub name in the local cache (default: the packaged MiniLM). Without a
        ``spec.model_name``, the model is identified (``embed.identify_model``), so that ESMs
        made for it by its hub name fit; the folder's name is the fallback."""
        from dataclasses import replace

        from .embed import Embedder, identify_model, resolve_model
        from .summary import join_probe, make_probe, summary_dim

        if esm_dtype not in ("float16", "float32"):
            raise ValueError("esm_dtype must be float16 or float32")
        folder = Path(folder)
        if (folder / "store.lmdb").exists():
            raise IndexStoreError(f"{folder}: an index exists there already")
        model_path = resolve_model(model_path) if model_path is not None else None
        spec = spec or EmbeddingSpec(model_name="" if model_path else DEFAULT_MODEL_NAME)
        embedder = Embedder(model_path, spec, device=device, batch_size=batch_size)
        identified = identify_model(embedder) if model_path is not None else DEFAULT_MODEL_NAME
        if not spec.model_name:
            spec = embedder.spec = replace(spec, model_name=identified or embedder.model_path.name)
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
                from .embed import Embedder, index_model_folder, resolve_model

                path = (resolve_model(self._model_path) if self._model_path
                        else index_model_folder(self.manifest, self.folder))
                self._embedder = Embedder(path, self.spec, device=self._device, batch_size=self._batch_size)
                if self._embedder.dim != self.manifest["dim"]:
                    raise ModelMismatchError(f"model {path} gives {self._embedder.dim}-d embeddings, "
                                             f"the index holds {self.manifest['dim']}-d ESMs")
            return self._embedder

    def embed(self, texts: Sequence, progress: bool = False) -> np.ndarray:
        """Embeddings of ``texts``, cached on disk by content hash + embedding spec."""
        from .embed import cached_embeddings

        return cached_embeddings(CACHE_DIR / "embeddings", self.spec, texts,
                                 lambda: self.embedder.embed(texts, progress=progress))

    # ---- adding and removing sources -----------------------------------------------------
    def check_esm(self, esm: ESM) -> None:
        """Raise unless ``esm`` fits this index's base model and dimension."""
        esm.validate(self.manifest["dim"])
        if esm.out_dim != self.manifest["out_dim"]:
            raise ModelMismatchError(f"ESM maps to {esm.out_dim} dimensions, the index holds {self.manifest['out_dim']}")
        base = esm.meta.get("base_model_name")
        if base and base != self.spec.model_name:
            raise ModelMismatchError(f"ESM was made for base model {base!r}, this index is for {self.spec.model_name!r}")

    def add_esms(self, items: Iterable[tuple[str, ESM]], batch_size: int = 64,
                 on_batch: Callable[[int], None] | None = None) -> tuple[int, int]:
        """Add (name, ESM) pairs, committing every ``batch_size``. Names already present are
        skipped, so a re-run after a crash resumes. Returns (added, skipped)."""
        from .summary import summarize

        self._writable()
        added = skipped = 0
        batch: list[tuple[str, ESM]] = []

        def flush() -> None:
            nonlocal added, skipped
            if not batch:
                return
            summaries = summarize(np.stack([e.weight for _, e in batch]), np.stack([e.bias for _, e in batch]), self.probe)
            meta = [_source_meta(e) for _, e in batch]
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

    def add_dataset(self, data: LabelledData, name: str, config=None, progress: bool = False,
                    meta: dict | None = None, replace: bool = False) -> ESM:
        """Fine-tune the base model on ``data``, fit its ESM and add it (slow: minutes).
        ``meta`` (language, tags, provenance...) is stored with the source. Everything that
        would make the work useless (a name already taken unless ``replace``, data a ranking
        would refuse, a config that trains nothing) is refused before fine-tuning starts."""
        from dataclasses import replace as with_fields

        from .finetune import FinetuneConfig, build_esm

        self._writable()
        if not replace and self.store.id_of(name) is not None:
            raise SourceExistsError(f"a source named {name!r} is in the index already "
                                    f"(replace=True, or --replace, overwrites it)")
        check_labels(data.labels, data.task, len(data.texts))
        check_size(len(data), what="data set")
        config = config or FinetuneConfig()
        check_positive(**{f: getattr(config, f, None) for f in ("max_examples", "fit_examples", "epochs",
                                                                "max_steps", "batch_size")})
        if not data.regression:
            data = with_fields(data, labels=dense_classes(data.labels))
        embedder = self.embedder
        log.info("fine-tuning the base model on %d examples of %s (at most %d, %d epochs), then fitting its ESM; "
                 "minutes on a CPU", len(data), name, config.max_examples, config.epochs)
        esm = build_esm(embedder, data, config, progress=progress)
        esm.meta.update({"task_id": name, "num_examples": len(data), "label_names": data.label_names, **(meta or {})})
        if replace:  # only now that the new map exists
            self.store.remove([name])
        self.add_esm(name, esm)
        return esm

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
        for sid, meta in self.store.iter_meta():
            _, w, b = self.store.esms([sid])
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in meta["name"])
            ESM(w[0], b[0], {k: v for k, v in meta.items() if k != "name"}).save(out / safe)
            count += 1
        return count

    # ---- the prefilter ---------------------------------------------------------------------
    def rebuild(self, reprobe: bool = False) -> None:
        """Regenerate the FAISS files from LMDB (the only state they hold is derived).

        The first rebuild of a writable index with at least 8 sources (or ``reprobe``) also
        fits the pool half of the probe and recomputes every summary (see summary.py)."""
        from .prefilter import build_prefilter, save_prefilter

        with self._lock:
            if not self.readonly and (reprobe or not self.manifest.get("probe_pool_fitted")) and len(self) >= 8:
                self._fit_probe()
            self._prefilter = build_prefilter(self.store, self.store.generation())
            if not self.readonly:
                save_prefilter(self.folder, self._prefilter)

    def _fit_probe(self, sample: int = 256) -> None:
        from .summary import join_probe, pool_directions, summarize

        ids = self.store.ids()
        ids = np.random.default_rng(0).permutation(ids)[:sample]
        _, w, b = self.store.esms(ids)
        k = self.probe.shape[1]
        probe = join_probe(self.store.probe("reference"), pool_directions(w, b, k // 2), k)
        self.store.reprobe(probe, lambda ww, bb: summarize(ww, bb, probe),
                           {"probe_pool_fitted": True, "probe_pool_sample": len(ids)})
        self.manifest = self.store.manifest
        self.probe = probe

    def prefilter(self):
        """The ``Prefilter`` current with LMDB; stale or damaged files are rebuilt (in memory
        only when the index is read-only)."""
        from .prefilter import load_prefilter

        with self._lock:
            gen = self.store.generation()
            if self._prefilter is None or self._prefilter.generation != gen:
                self.store._manifest = None  # another process may have refitted the probe
                self.manifest, self.probe = self.store.manifest, self.store.probe()
                self._prefilter = load_prefilter(self.folder, gen)
                if self._prefilter is None:
                    self.rebuild()
            return self._prefilter

    def verify(self) -> list[str]:
        """Problems found (empty when clean): LMDB tables agree, weights finite, FAISS
        files present, current and holding exactly the stored sources."""
        from .prefilter import load_prefilter

        problems = self.store.check()
        gen = self.store.generation()
        loaded = load_prefilter(self.folder, gen)
        if loaded is None:
            problems.append("prefilter files missing, unreadable or stale (run 'esm-index rebuild')")
        else:
            faiss_ids, store_ids = np.sort(loaded.ids()), np.sort(self.store.ids())
            if not np.array_equal(faiss_ids, store_ids):
                problems.append(f"FAISS holds {len(faiss_ids)} sources, LMDB {len(store_ids)}")
        return problems

    # ---- ranking ---------------------------------------------------------------------------
    def rank(self, texts: Sequence, labels, task: str = "classification", top: int = 10,
             shortlist: int | None = DEFAULT_SHORTLIST, candidates: int | None = None,
             exact: bool = False, filters: Filters | None = None, progress: bool = False,
             refine: int | None = None, method: str = DEFAULT_METHOD) -> Ranking:
        """Rank the pool's sources for a target given as texts and labels (class ids, or
        floats for regression). Bad targets are refused before the (slow) embedding.
        ``method``: "combined" (ESM-LogME and domain similarity, the default), "esm-logme"
        (the paper's score alone) or "domain" (domain similarity alone); see domain.py."""
        check_labels(labels, task, len(texts))
        check_size(len(texts))
        check_stages(top, shortlist, exact, candidates, refine)
        check_method(method)
        if filters and not any(filters.accepts(m) for _, m in self.store.iter_meta()):  # stops at a match
            raise NoSourcesError(f"no source of the index matches the filters ({filters.describe()})")
        t0 = time.perf_counter()
        x = self.embed(texts, progress=progress)
        ranking = self.rank_embeddings(x, labels, task, top, shortlist, candidates, exact, filters, refine, method)
        ranking.timings = {"embed": round(time.perf_counter() - t0 - sum(ranking.timings.values()), 4),
                           **ranking.timings}
        return ranking

    def rank_embeddings(self, x: np.ndarray, labels, task: str = "classification", top: int = 10,
                        shortlist: int | None = DEFAULT_SHORTLIST, candidates: int | None = None,
                        exact: bool = False, filters: Filters | None = None,
                        refine: int | None = None, method: str = DEFAULT_METHOD) -> Ranking:
        """Rank from precomputed base-model embeddings (n, d) of the target."""
        from .logme import one_blas_thread

        with one_blas_thread():
            return self._rank_embeddings(x, labels, task, top, shortlist, candidates, exact, filters, refine, method)

    def _rank_embeddings(self, x: np.ndarray, labels, task: str, top: int, shortlist: int | None,
                         candidates: int | None, exact: bool, filters: Filters | None, refine: int | None,
                         method: str) -> Ranking:
        from .domain import combine, similarities
        from .logme import TargetStats, score_esms

        regression = task == "regression"
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.manifest["dim"]:
            raise ModelMismatchError(f"target embeddings have shape {x.shape}; this index needs (n, {self.manifest['dim']})")
        labels = np.asarray(labels)
        about = check_labels(labels, task, len(x))
        warnings = check_size(len(x), self.manifest["dim"])
        check_stages(top, shortlist, exact, candidates, refine)
        check_method(method)
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[name] = round(now - clock, 4)
            clock = now

        device = self._device or ("cuda" if _cuda() else "cpu")
        target = TargetStats.from_embeddings(x, labels, regression, device=device)
        allowed = None
        if filters:
            allowed = np.asarray([i for i, m in self.store.iter_meta() if filters.accepts(m)], np.int64)
        pool_size = self.store.count() if allowed is None else len(allowed)
        if allowed is not None and not pool_size:
            raise NoSourcesError(f"no source of the index matches the filters ({filters.describe()})")
        stage: dict[int, dict] = {}
        if exact or shortlist is None or shortlist >= pool_size:
            found, w, b = self.store.esms(self.store.ids() if allowed is None else allowed)
        else:
            from .prefilter import shortlist as prefilter_shortlist

            prefilter = self.prefilter()
            lap("prepare")
            found, w, b, stage = prefilter_shortlist(self.store, self.probe, prefilter, target, allowed,
                                                     shortlist, candidates, refine, lap)
            if method != "esm-logme":  # the nearest domains are scored too, whatever their approximate score
                near = prefilter.domain.search(x, shortlist, allowed)
                found_near, w_near, b_near = self.store.esms(near[~np.isin(near, found)])
                found, w, b = (np.concatenate([found, found_near]), np.concatenate([w, w_near]),
                               np.concatenate([b, b_near]))
        lap("load")
        import torch

        logme = score_esms(target, torch.from_numpy(w), torch.from_numpy(b)) if len(found) else np.zeros(0)
        lap("exact")
        metas = self.store.metas(found)
        domain = similarities(x, metas)
        if method == "combined" and not np.isfinite(domain).any():
            method = "esm-logme"  # no source scored has a domain vector (hfselect's ESMs): say what ranked
        elif method == "domain" and len(found) and not np.isfinite(domain).any():
            raise NoSourcesError("no source scored has a domain vector, so there is nothing to rank by domain "
                                 "similarity (sources made by 'esm-index add' or tools/build_pool.py have one)")
        scores = combine(logme, domain, method)
        order = np.lexsort((-logme, -scores))[:top]  # ties (no domain vector, by "domain"): by ESM-LogME
        results = []
        for rank, j in enumerate(order, 1):
            sid, meta = int(found[j]), metas[j]
            result = {"rank": rank, "source": meta["name"],
                      "score": float(scores[j]) if np.isfinite(scores[j]) else None,
                      "esm_logme": float(logme[j]),
                      "domain_similarity": float(domain[j]) if np.isfinite(domain[j]) else None,
                      "approx_score": None, **stage.get(sid, {})}
            result["meta"] = {k: v for k, v in meta.items() if k not in ("name", "fit", "finetune", "embedding", DOMAIN_KEY)}
            results.append(result)
        return Ranking(results, pool_size=pool_size, timings=timings, target=about, warnings=warnings,
                       method=method)


def _source_meta(esm: ESM) -> dict:
    """What we keep of an ESM's config: everything JSON, plus the fields filters use.
    ``name`` is the source's key in the index, so a descriptive name becomes ``title``."""
    meta = dict(esm.meta)
    if "name" in meta:
        meta.setdefault("title", meta.pop("name"))
    meta.setdefault("task_type", "classification")
    return meta


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
