"""The source store: one LMDB environment, the index's source of truth.

Named databases inside ``<index>/store.lmdb``:

    info     manifest (JSON), probe and reference directions (float32 bytes), next_id, generation
    names    source name (utf-8)       -> id (8-byte big-endian)
    meta     id -> JSON metadata
    esm      id -> W and b in the index's encoding (encoding.py: float16, float32 or float16-factor; never pickled)
    summary  id -> float32 summary vector (see prefilter.py)
    summary_b    the other summary table: ``info`` key ``summary_table`` names the current one
                 (absent: "summary"); a reprobe stages the new summaries in the other

Every write is one LMDB transaction, so a killed writer loses only its uncommitted batch and
readers never see half a source. LMDB allows many reader processes beside one writer.
``generation`` counts committed writes; the FAISS files record the generation they were
built from, which is how a stale prefilter is noticed.

Memory does not grow with the pool: every full pass (``iter_esms``, ``iter_meta``,
``iter_summaries``, ``check``, ``reprobe``) reads in batches, and drops this process's
mapping of the pages it read after each batch (pages.py), so that neither the
arrays nor LMDB's memory map of a 30 GB store pile up in RSS.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .encoding import DEFAULT_ENCODING, Encoding, get_encoding
from .errors import IndexStoreError, InvalidArgumentError
from .pages import drop_read_pages

SCHEMA_VERSION = 1
MAP_SIZE = 1 << 40  # address space only; LMDB files grow as data is written
SUMMARY_TABLES = ("summary", "summary_b")  # the current one is named by info's summary_table
DBS = (b"info", b"names", b"meta", b"esm", *(t.encode() for t in SUMMARY_TABLES))
SCAN_BATCH = 512  # sources per batch of a full pass over the maps: 0.3 GB of float32 maps at
# D = d = 384, a tenth of the 4 GB budget, and 8 of the scorer's 64-source chunks per batch
REPROBE_CHUNK = 4096  # summaries per staged reprobe transaction: ~20 MB of dirty pages
PAGE_DROP_EVERY = 4096  # entries between page drops in the passes over small values


def _key(i: int) -> bytes:
    return struct.pack(">Q", i)


def _id(key: bytes) -> int:
    return struct.unpack(">Q", key)[0]


def _float32(*stacks) -> tuple[np.ndarray, ...]:
    """Each sequence of stored arrays stacked as float32, exactly. Cast one array at a time:
    torch casts a cache-sized float16 array faster than it casts a whole stack (64 maps of
    the 10k bench pool, allocation included, timed in one process on the loaded 2-core VM:
    14 ms against 19 ms)."""
    out = []
    for arrays in stacks:
        stored = np.stack(arrays)  # a writable copy (the arrays are read-only views of LMDB's bytes)
        stack = np.empty(stored.shape, np.float32)
        for row, array in zip(torch.from_numpy(stack), torch.from_numpy(stored)):
            row.copy_(array)
        out.append(stack)
    return tuple(out)


@dataclass
class NewSource:
    name: str
    weight: np.ndarray  # (D, d)
    bias: np.ndarray  # (D,)
    meta: dict
    summary: np.ndarray  # (s,) float32


_OPEN: dict[str, list] = {}  # path -> [env, dbs, users]: LMDB allows one env per file per process
_OPEN_LOCK = threading.Lock()


def _acquire(path: Path, create: bool):
    import lmdb

    key = str(path.resolve())
    with _OPEN_LOCK:
        if key not in _OPEN:
            # Read-write unless the folder is not writable (a read-only checkout): the
            # read-only/read-write distinction of Store is enforced by Store itself.
            readonly = path.exists() and not os.access(path, os.W_OK)
            env = lmdb.open(key, map_size=MAP_SIZE, max_dbs=len(DBS), readonly=readonly, lock=not readonly,
                            create=create, readahead=False)
            dbs = {}
            for name in DBS:  # summary_b is made by the first reprobe (Store._table), not here
                try:
                    dbs[name.decode()] = env.open_db(name, create=not readonly and name != b"summary_b")
                except lmdb.NotFoundError:
                    pass
            _OPEN[key] = [env, dbs, 0]
        _OPEN[key][2] += 1
        return key, _OPEN[key][0], _OPEN[key][1]


def _release(key: str) -> None:
    with _OPEN_LOCK:
        entry = _OPEN.get(key)
        if entry is not None:
            entry[2] -= 1
            if entry[2] == 0:
                entry[0].close()
                del _OPEN[key]


class Store:
    """Typed access to the LMDB environment of one index."""

    def __init__(self, folder: str | os.PathLike, readonly: bool = False, create: bool = False) -> None:
        import lmdb

        self.path = Path(folder) / "store.lmdb"
        self.readonly = readonly
        if not create and not (self.path / "data.mdb").is_file():
            raise IndexStoreError(f"{folder}: not an esm-index index (no store.lmdb); run 'esm-index init'")
        try:
            self._key, self.env, self.db = _acquire(self.path, create)
        except lmdb.Error as exc:
            raise IndexStoreError(f"{self.path}: cannot open the LMDB store ({exc})") from None
        self._manifest: dict | None = None
        self._data_file = (self.path / "data.mdb").resolve()

    @contextmanager
    def _begin(self, write: bool = False, buffers: bool = False):
        """A transaction and the handle of the summary table current in it (a staged reprobe
        switches tables). LMDB gives a transaction only the tables opened before it began: if
        another process's first reprobe has made the table since, it is opened and the
        transaction begun again."""
        while True:
            txn = self.env.begin(write=write, buffers=buffers)
            raw = txn.get(b"summary_table", db=self.db["info"])
            name = SUMMARY_TABLES[0] if raw is None else bytes(raw).decode()
            if name in self.db:
                break
            txn.abort()
            self._table(name)
        with txn:
            yield txn, self.db[name]

    def _table(self, name: str, create: bool = False):
        """The handle of table ``name``. summary_b does not exist until a reprobe first stages
        into it (``create``: opening an index writes nothing into it); a process that opened
        the index before another one made it opens it here, before the transactions that use
        it begin, in a write transaction (py-lmdb keeps a handle opened in a read one for that
        transaction only; opening an existing table writes nothing)."""
        if name not in self.db:
            import lmdb

            with _OPEN_LOCK:
                if name not in self.db:  # self.db is shared by every Store of this file in the process
                    try:
                        with self.env.begin(write=create or not self.env.flags()["readonly"]) as txn:
                            self.db[name] = self.env.open_db(name.encode(), txn=txn, create=create)
                    except lmdb.Error as exc:
                        raise IndexStoreError(f"{self.path}: cannot open the table {name} ({exc})") from None
        return self.db[name]

    def _drop_pages(self) -> None:
        drop_read_pages(self._data_file)

    def close(self) -> None:
        if self._key is not None:
            _release(self._key)
            self._key = None

    # ---- manifest and probe --------------------------------------------------------------
    def init(self, manifest: dict, probe: np.ndarray, reference: np.ndarray) -> None:
        with self.env.begin(write=True) as txn:
            if txn.get(b"manifest", db=self.db["info"]) is not None:
                raise IndexStoreError(f"{self.path.parent}: already an index")
            manifest = {**manifest, "schema_version": SCHEMA_VERSION, "probe_shape": list(probe.shape),
                        "reference_shape": list(reference.shape)}
            txn.put(b"manifest", json.dumps(manifest).encode(), db=self.db["info"])
            txn.put(b"probe", np.ascontiguousarray(probe, "<f4").tobytes(), db=self.db["info"])
            txn.put(b"reference", np.ascontiguousarray(reference, "<f4").tobytes(), db=self.db["info"])
            txn.put(b"next_id", _key(1), db=self.db["info"])
            txn.put(b"generation", _key(0), db=self.db["info"])

    def reprobe(self, probe: np.ndarray, summarize, manifest_update: dict, batch: int = 256,
                chunk: int = REPROBE_CHUNK) -> None:
        """Replace the probe and recompute every summary with ``summarize(W, b)``, staged
        (one transaction would hold every summary's dirty pages: ~33 GB at 1M): the new
        summaries fill the table that is not current, ``chunk`` sources per transaction
        (``stage_summaries``); one small transaction switches table, probe and manifest
        (``switch_summaries``), and the old table is emptied in chunks. Readers see the old
        probe and summaries until the switch and the new ones after it; an interrupted
        reprobe leaves the old ones current and intact (the next one clears what it staged)."""
        staged = self.stage_summaries(summarize, batch, chunk)
        self.switch_summaries(staged, probe, summarize, manifest_update, batch, chunk)

    def stage_summaries(self, summarize, batch: int = 256, chunk: int = REPROBE_CHUNK) -> tuple[str, int]:
        """Fill the summary table that is not current with ``summarize(W, b)`` of every
        source, ``chunk`` per transaction in id order. Returns (that table, the generation
        it was staged from), for ``switch_summaries``."""
        with self._begin() as (txn, current):
            generation = _id(txn.get(b"generation", db=self.db["info"]))
        name = next(t for t in SUMMARY_TABLES if self._table(t, create=True) is not current)
        self._clear(self.db[name], chunk)  # what an interrupted reprobe left
        after = None
        while True:
            with self.env.begin(write=True, buffers=True) as txn:
                cursor = txn.cursor(db=self.db["esm"])
                found = cursor.set_range(after) if after is not None else cursor.first()
                keys = []
                while found and len(keys) < chunk:
                    if cursor.key() != after:
                        keys.append(bytes(cursor.key()))
                    found = cursor.next()
                self._summarize_into(txn, self.db[name], keys, summarize, batch)
            self._drop_pages()
            if len(keys) < chunk:
                return name, generation
            after = keys[-1]

    def switch_summaries(self, staged: tuple[str, int], probe: np.ndarray, summarize, manifest_update: dict,
                         batch: int = 256, chunk: int = REPROBE_CHUNK) -> None:
        """Make the staged table current, with its probe and manifest, in one transaction,
        then empty the old one. Sources another writer added or removed since staging
        (the generation moved) are summarised or dropped in that transaction."""
        name, generation = staged
        with self._begin(write=True) as (txn, old):
            if old is self.db[name]:
                raise IndexStoreError(f"{self.path.parent}: the staged summaries are current already")
            if _id(txn.get(b"generation", db=self.db["info"])) != generation:
                self._reconcile(txn, self.db[name], summarize, batch)
            manifest = {**self.manifest, **manifest_update, "probe_shape": list(probe.shape)}
            txn.put(b"manifest", json.dumps(manifest).encode(), db=self.db["info"])
            txn.put(b"probe", np.ascontiguousarray(probe, "<f4").tobytes(), db=self.db["info"])
            txn.put(b"summary_table", name.encode(), db=self.db["info"])
            self._bump(txn)
        self._manifest = None
        self._clear(old, chunk)

    def _summarize_into(self, txn, table, keys: list[bytes], summarize, batch: int) -> None:
        """Put ``summarize(W, b)`` of the sources ``keys`` into ``table``, ``batch`` at a time."""
        for start in range(0, len(keys), batch):
            part = keys[start:start + batch]
            w, b = _float32(*zip(*(self._decode_esm(txn.get(k, db=self.db["esm"]), _id(k)) for k in part)))
            for k, vec in zip(part, summarize(w, b)):
                txn.put(k, np.ascontiguousarray(vec, "<f4").tobytes(), db=table)

    def _reconcile(self, txn, staged, summarize, batch: int) -> None:
        """Make ``staged`` hold exactly the stored sources: another writer added or removed
        some while it was being filled. A merge of the two tables' keys, in id order."""
        esm = txn.cursor(db=self.db["esm"]).iternext(values=False)
        have = txn.cursor(db=staged).iternext(values=False)
        missing, extra = [], []
        a, b = next(esm, None), next(have, None)
        while a is not None or b is not None:
            if b is None or (a is not None and a < b):
                missing.append(bytes(a))
                a = next(esm, None)
            elif a is None or b < a:
                extra.append(bytes(b))
                b = next(have, None)
            else:
                a, b = next(esm, None), next(have, None)
        for k in extra:
            txn.delete(k, db=staged)
        self._summarize_into(txn, staged, missing, summarize, batch)

    def _clear(self, table, chunk: int) -> None:
        """Empty a table that no reader uses, ``chunk`` rows per transaction."""
        while True:
            with self.env.begin(write=True) as txn:
                keys = list(islice(txn.cursor(db=table).iternext(values=False), chunk))
                for k in keys:
                    txn.delete(k, db=table)
            if len(keys) < chunk:
                return

    def reload_manifest(self) -> None:
        """Read the manifest again on next use (another process may have changed it)."""
        self._manifest = None

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            with self.env.begin() as txn:
                raw = txn.get(b"manifest", db=self.db["info"])
            if raw is None:
                raise IndexStoreError(f"{self.path.parent}: the index has no manifest")
            self._manifest = json.loads(raw)
            if self._manifest.get("schema_version") != SCHEMA_VERSION:
                raise IndexStoreError(f"{self.path.parent}: schema version "
                                      f"{self._manifest.get('schema_version')}, expected {SCHEMA_VERSION}")
        return self._manifest

    def probe(self, name: str = "probe") -> np.ndarray:
        """The prefilter's probe U (or, with name="reference", the reference directions)."""
        with self.env.begin() as txn:
            raw = txn.get(name.encode(), db=self.db["info"])
        return np.frombuffer(raw, "<f4").reshape(self.manifest[f"{name}_shape"]).copy()

    def generation(self) -> int:
        with self.env.begin() as txn:
            return _id(txn.get(b"generation", db=self.db["info"]))

    # ---- writes --------------------------------------------------------------------------
    @property
    def encoding(self) -> Encoding:
        """How this index writes an ESM's bytes (encoding.py); the manifest's ``esm_dtype``,
        float16 when absent."""
        try:
            return get_encoding(self.manifest.get("esm_dtype", DEFAULT_ENCODING))
        except InvalidArgumentError as exc:  # a manifest, not an option: the index is the problem
            raise IndexStoreError(f"{self.path.parent}: {exc} (made by a newer esm-index?)") from None

    # ---- the ESM byte format: the index's encoding (encoding.py) ----------------------------
    def _encode_esm(self, weight: np.ndarray, bias: np.ndarray) -> bytes:
        return self.encoding.encode(weight, bias)

    def _decode_esm(self, raw: bytes, source: int) -> tuple[np.ndarray, np.ndarray]:
        """(W (D, d), b (D,)) as the encoding gives them (float16 views of ``raw`` for float16,
        cast by the caller); a wrong size is an ``IndexStoreError`` naming the source."""
        try:
            return self.encoding.decode(raw, self.manifest["out_dim"], self.manifest["dim"])
        except IndexStoreError as exc:
            raise IndexStoreError(f"source {source}: {exc}") from None

    def add(self, sources: Iterable[NewSource]) -> list[int | None]:
        """Add sources in one transaction; a name already present is skipped (None), which
        makes a re-run of an interrupted import resume instead of duplicating."""
        ids: list[int | None] = []
        with self._begin(write=True) as (txn, summaries):
            next_id = _id(txn.get(b"next_id", db=self.db["info"]))
            for src in sources:
                name = src.name.encode()
                if txn.get(name, db=self.db["names"]) is not None:
                    ids.append(None)
                    continue
                key = _key(next_id)
                txn.put(name, key, db=self.db["names"])
                txn.put(key, json.dumps({**src.meta, "name": src.name}).encode(), db=self.db["meta"])
                txn.put(key, self._encode_esm(src.weight, src.bias), db=self.db["esm"])
                txn.put(key, np.ascontiguousarray(src.summary, "<f4").tobytes(), db=summaries)
                ids.append(next_id)
                next_id += 1
            txn.put(b"next_id", _key(next_id), db=self.db["info"])
            self._bump(txn)
        return ids

    def remove(self, names: Iterable[str]) -> list[str]:
        """Remove sources by name; returns the names that were not there."""
        missing = []
        with self._begin(write=True) as (txn, summaries):
            for name in names:
                key = txn.pop(name.encode(), db=self.db["names"])
                if key is None:
                    missing.append(name)
                    continue
                for db in (self.db["meta"], self.db["esm"], summaries):
                    txn.delete(key, db=db)
            self._bump(txn)
        return missing

    def _bump(self, txn) -> None:
        gen = _id(txn.get(b"generation", db=self.db["info"]))
        txn.put(b"generation", _key(gen + 1), db=self.db["info"])

    # ---- reads ---------------------------------------------------------------------------
    def count(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self.db["meta"])["entries"]

    def ids(self) -> np.ndarray:
        with self.env.begin() as txn:
            return np.fromiter((_id(k) for k in txn.cursor(db=self.db["meta"]).iternext(values=False)), np.int64)

    def id_of(self, name: str) -> int | None:
        with self.env.begin() as txn:
            key = txn.get(name.encode(), db=self.db["names"])
        return None if key is None else _id(key)

    def metas(self, ids: Iterable[int]) -> list[dict | None]:
        with self.env.begin() as txn:
            raws = [txn.get(_key(int(i)), db=self.db["meta"]) for i in ids]
        return [None if r is None else json.loads(r) for r in raws]

    def iter_meta(self) -> Iterator[tuple[int, dict]]:
        with self.env.begin() as txn:
            for n, (k, v) in enumerate(txn.cursor(db=self.db["meta"]), 1):
                yield _id(k), json.loads(v)
                if n % PAGE_DROP_EVERY == 0:
                    self._drop_pages()
        self._drop_pages()

    def iter_esms(self, ids: Iterable[int] | None = None, batch: int | None = None,
                  metas: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, list[dict] | None]]:
        """(ids, W (B, D, d) float32, b (B, D) float32, metadata or None) of the stored sources
        (default: all, in id order; else the given ids still present, in their order), ``batch``
        at a time (default SCAN_BATCH), from one read transaction: a pass over the pool whose
        memory is one batch, whatever the pool's size. The values are those ``esms`` gives."""
        dim, out_dim, batch = self.manifest["dim"], self.manifest["out_dim"], batch or SCAN_BATCH
        with self.env.begin(buffers=True) as txn:
            if ids is None:
                keys = (bytes(k) for k in txn.cursor(db=self.db["esm"]).iternext(values=False))
            else:
                keys = (_key(int(i)) for i in ids)
            while True:
                found, w, b = [], np.empty((batch, out_dim, dim), np.float32), np.empty((batch, out_dim), np.float32)
                for k in keys:
                    raw = txn.get(k, db=self.db["esm"])
                    if raw is None:
                        continue
                    w[len(found)], b[len(found)] = self._decode_esm(raw, _id(k))
                    found.append(k)
                    if len(found) == batch:
                        break
                if not found:
                    break
                meta = [json.loads(bytes(txn.get(k, db=self.db["meta"]))) for k in found] if metas else None
                n = len(found)
                yield np.asarray([_id(k) for k in found], np.int64), w[:n], b[:n], meta
                self._drop_pages()
                if n < batch:
                    break

    def esms(self, ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found_ids, W (B, D, d) float32, b (B, D) float32) for the ids still present."""
        found, ws, bs = [], [], []
        with self.env.begin() as txn:
            for i in ids:
                raw = txn.get(_key(int(i)), db=self.db["esm"])
                if raw is not None:
                    w, b = self._decode_esm(raw, int(i))
                    found.append(int(i))
                    ws.append(w)
                    bs.append(b)
        if not found:
            dim, out_dim = self.manifest["dim"], self.manifest["out_dim"]
            return np.zeros(0, np.int64), np.zeros((0, out_dim, dim), np.float32), np.zeros((0, out_dim), np.float32)
        return (np.asarray(found), *_float32(ws, bs))

    def summaries(self, ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, summary vectors) for the given ids (default: all), skipping missing ones."""
        found, vecs = [], []
        with self._begin() as (txn, table):
            if ids is None:
                for k, v in txn.cursor(db=table):
                    found.append(_id(k))
                    vecs.append(np.frombuffer(v, "<f4"))
            else:
                for i in ids:
                    raw = txn.get(_key(int(i)), db=table)
                    if raw is not None:
                        found.append(int(i))
                        vecs.append(np.frombuffer(raw, "<f4"))
        width = self.manifest["summary_dim"]
        return np.asarray(found, np.int64), (np.stack(vecs) if vecs else np.zeros((0, width), np.float32))

    def iter_summaries(self, batch: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (ids, summary vectors) in chunks of ``batch``, one read transaction: a pass
        over a large pool without holding every summary in memory."""
        with self._begin() as (txn, table):
            ids, vecs = [], []
            for k, v in txn.cursor(db=table):
                ids.append(_id(k))
                vecs.append(np.frombuffer(v, "<f4"))
                if len(ids) == batch:
                    yield np.asarray(ids, np.int64), np.stack(vecs)
                    ids, vecs = [], []
                    self._drop_pages()
            if ids:
                yield np.asarray(ids, np.int64), np.stack(vecs)
        self._drop_pages()

    def check(self) -> list[str]:
        """Consistency problems between the tables, and unusable weights (empty when clean).
        One streamed pass: the ids are compared as sorted int64 arrays (8 bytes a source)."""
        problems = []
        width = self.manifest["summary_dim"]
        with self._begin() as (txn, summaries):
            named = np.unique(np.fromiter((_id(v) for _, v in txn.cursor(db=self.db["names"])), np.int64))
            tables = {"meta": self.db["meta"], "esm": self.db["esm"], "summary": summaries}
            for name, table in tables.items():
                ks = np.fromiter((_id(k) for k in txn.cursor(db=table).iternext(values=False)), np.int64)
                if not np.array_equal(ks, named):
                    problems.append(f"table {name} has {len(ks)} entries, names has {len(named)}")
            self._drop_pages()
            for n, (k, raw) in enumerate(txn.cursor(db=self.db["esm"]), 1):
                try:
                    w, b = self._decode_esm(raw, _id(k))
                except IndexStoreError as exc:
                    problems.append(str(exc))
                    continue
                if not (np.isfinite(w).all() and np.isfinite(b).all()):
                    problems.append(f"source {_id(k)}: ESM weights not finite")
                if n % SCAN_BATCH == 0:
                    self._drop_pages()
            for k, raw in txn.cursor(db=tables["summary"]):
                if len(raw) != 4 * width:
                    problems.append(f"source {_id(k)}: summary has the wrong size")
        self._drop_pages()
        return problems

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir())
