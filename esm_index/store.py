"""The source store: one LMDB environment, the index's source of truth.

Named databases inside ``<index>/store.lmdb``:

    info     manifest (JSON), probe and reference directions (float32 bytes), next_id, generation
    names    source name (utf-8)       -> id (8-byte big-endian)
    meta     id -> JSON metadata
    esm      id -> W and b in the index's encoding (encoding.py: float16, float32 or float16-factor; never pickled)
    summary  id -> float32 summary vector (see prefilter.py)

Every write is one LMDB transaction, so a killed writer loses only its uncommitted batch and
readers never see half a source. LMDB allows many reader processes beside one writer.
``generation`` counts committed writes; the FAISS files record the generation they were
built from, which is how a stale prefilter is noticed.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .encoding import DEFAULT_ENCODING, Encoding, get_encoding
from .errors import IndexStoreError, InvalidArgumentError

SCHEMA_VERSION = 1
MAP_SIZE = 1 << 40  # address space only; LMDB files grow as data is written
DBS = (b"info", b"names", b"meta", b"esm", b"summary")


def _key(i: int) -> bytes:
    return struct.pack(">Q", i)


def _id(key: bytes) -> int:
    return struct.unpack(">Q", key)[0]


def _float32(*stacks) -> tuple[np.ndarray, ...]:
    """Each sequence of stored arrays stacked as float32 (torch casts float16 twice as fast
    as numpy, and exactly)."""
    return tuple(torch.from_numpy(np.stack(arrays)).float().numpy() for arrays in stacks)


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
            dbs = {name.decode(): env.open_db(name, create=not readonly) for name in DBS}
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

    def reprobe(self, probe: np.ndarray, summarize, manifest_update: dict, batch: int = 256) -> None:
        """Replace the probe and recompute every summary with ``summarize(W, b)``, in one
        transaction: readers see either the old probe and summaries or the new ones."""
        with self.env.begin(write=True) as txn:
            keys = list(txn.cursor(db=self.db["esm"]).iternext(values=False))
            for start in range(0, len(keys), batch):
                chunk = keys[start:start + batch]
                w, b = _float32(*zip(*(self._decode_esm(txn.get(k, db=self.db["esm"]), _id(k)) for k in chunk)))
                for k, vec in zip(chunk, summarize(w, b)):
                    txn.put(k, np.ascontiguousarray(vec, "<f4").tobytes(), db=self.db["summary"])
            manifest = {**self.manifest, **manifest_update, "probe_shape": list(probe.shape)}
            txn.put(b"manifest", json.dumps(manifest).encode(), db=self.db["info"])
            txn.put(b"probe", np.ascontiguousarray(probe, "<f4").tobytes(), db=self.db["info"])
            self._bump(txn)
        self._manifest = None

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
        with self.env.begin(write=True) as txn:
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
                txn.put(key, np.ascontiguousarray(src.summary, "<f4").tobytes(), db=self.db["summary"])
                ids.append(next_id)
                next_id += 1
            txn.put(b"next_id", _key(next_id), db=self.db["info"])
            self._bump(txn)
        return ids

    def remove(self, names: Iterable[str]) -> list[str]:
        """Remove sources by name; returns the names that were not there."""
        missing = []
        with self.env.begin(write=True) as txn:
            for name in names:
                key = txn.pop(name.encode(), db=self.db["names"])
                if key is None:
                    missing.append(name)
                    continue
                for db in ("meta", "esm", "summary"):
                    txn.delete(key, db=self.db[db])
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
            for k, v in txn.cursor(db=self.db["meta"]):
                yield _id(k), json.loads(v)

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
        with self.env.begin() as txn:
            if ids is None:
                for k, v in txn.cursor(db=self.db["summary"]):
                    found.append(_id(k))
                    vecs.append(np.frombuffer(v, "<f4"))
            else:
                for i in ids:
                    raw = txn.get(_key(int(i)), db=self.db["summary"])
                    if raw is not None:
                        found.append(int(i))
                        vecs.append(np.frombuffer(raw, "<f4"))
        width = self.manifest["summary_dim"]
        return np.asarray(found, np.int64), (np.stack(vecs) if vecs else np.zeros((0, width), np.float32))

    def iter_summaries(self, batch: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (ids, summary vectors) in chunks of ``batch``, one read transaction: a pass
        over a large pool without holding every summary in memory."""
        with self.env.begin() as txn:
            ids, vecs = [], []
            for k, v in txn.cursor(db=self.db["summary"]):
                ids.append(_id(k))
                vecs.append(np.frombuffer(v, "<f4"))
                if len(ids) == batch:
                    yield np.asarray(ids, np.int64), np.stack(vecs)
                    ids, vecs = [], []
            if ids:
                yield np.asarray(ids, np.int64), np.stack(vecs)

    def check(self) -> list[str]:
        """Consistency problems between the tables, and unusable weights (empty when clean)."""
        problems = []
        width = self.manifest["summary_dim"]
        with self.env.begin() as txn:
            named = {v for _, v in txn.cursor(db=self.db["names"])}
            keys = {db: set(txn.cursor(db=self.db[db]).iternext(values=False)) for db in ("meta", "esm", "summary")}
            for db, ks in keys.items():
                if ks != named:
                    problems.append(f"table {db} has {len(ks)} entries, names has {len(named)}")
            for k in keys["esm"]:
                try:
                    w, b = self._decode_esm(txn.get(k, db=self.db["esm"]), _id(k))
                except IndexStoreError as exc:
                    problems.append(str(exc))
                    continue
                if not (np.isfinite(w).all() and np.isfinite(b).all()):
                    problems.append(f"source {_id(k)}: ESM weights not finite")
            for k in keys["summary"]:
                if len(txn.get(k, db=self.db["summary"])) != 4 * width:
                    problems.append(f"source {_id(k)}: summary has the wrong size")
        return problems

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir())
