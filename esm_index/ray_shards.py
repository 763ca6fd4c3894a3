"""The shards of a ``ShardedIndex`` (shards.py) queried by Ray actors, one per shard or fewer.

Each actor opens its shards read-only where it runs and keeps them open, with their FAISS
files, LMDB maps and compiled kernels warm, for every later query. A query sends the target's
base embeddings and labels once (``ray.put``), each actor runs ``shard_query.score_shard`` on its
shards one after another, and the driver merges what they send back (``shard_query.merge``).

Ray is optional (``pip install 'esm-index[ray]'``): a sharded index with ``workers=0`` runs
the same ``score_shard`` in the driver's process. On a cluster, every node that runs an
actor must have esm-index installed and the shard folders at the same absolute path (a
shared file system, or a copy of each shard where its actor is placed). Actors are spread
over the nodes (``SPREAD``). Ray moves the embeddings and results between its own processes
with its own serialisation; that is a trusted channel inside one cluster, not a file a user
hands us (those are safetensors/JSON only).
"""

from __future__ import annotations

import os

import numpy as np

from .errors import EsmIndexError, IndexStoreError, InvalidArgumentError
from .results import Query


def kernel_threads(threads: int) -> None:
    """Threads for this process's numba, FAISS and torch kernels (as server.py sets them per
    query thread: on a busy machine, OpenMP teams larger than the free cores stall)."""
    import faiss
    import numba
    import torch

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)


class ShardWorker:
    """The actor's class: opens ``folders`` read-only and scores them for each query.
    ``threads``: numba / FAISS / torch threads for its kernels (Ray starts workers with one
    OpenMP thread when an actor reserves no CPUs; None leaves the process as it is)."""

    def __init__(self, folders: list[str], device: str | None = None, threads: int | None = None) -> None:
        from .index import SourceIndex

        if threads:
            kernel_threads(threads)
        self.shards, self.error = [], None
        try:
            self.shards = [SourceIndex(f, readonly=True, device=device) for f in folders]
        except EsmIndexError as exc:  # raised by ``ready``: a failed actor creation loses the error's type
            self.error = exc

    def score(self, x: np.ndarray, labels: np.ndarray, task: str, query: Query) -> list:
        from .shard_query import score_shard

        return [score_shard(shard, x, labels, task, query) for shard in self.shards]

    def ready(self) -> int:
        """Sources held: lets the driver wait until every actor has opened its shards, and
        see why one could not."""
        if self.error is not None:
            raise self.error
        return sum(len(s) for s in self.shards)


class RayShards:
    """``workers`` actors over the shard folders (actor i holds shards i, i + workers, ...),
    each running its kernels on ``threads`` threads (None: this machine's cores divided among
    the actors when Ray is local; on a cluster, what each node's process has). Joins the Ray
    instance this process already started, else the cluster at ``address``, else starts a
    local one (and shuts it down on ``close``)."""

    def __init__(self, folders: list[str], workers: int, address: str | None = None,
                 device: str | None = None, threads: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise InvalidArgumentError("Ray is not installed: pip install 'esm-index[ray]' (or workers=0, "
                                       "--workers 0, to query the shards in this process)") from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            try:
                if address:
                    ray.init(address=address, log_to_driver=False)
                else:
                    ray.init(include_dashboard=False, log_to_driver=False)
            except Exception as exc:  # Ray raises plain Exception too (e.g. a node start-up timeout)
                ray.shutdown()  # what a failed start left running
                raise InvalidArgumentError(f"cannot start or reach Ray at {address or 'a local instance'}: "
                                           f"{_first_line(exc)}") from None
            self._started = True
        workers = min(workers, len(folders))
        if threads is None and not address:  # a local instance: the cores shared among the actors
            threads = max(1, (os.cpu_count() or 1) // workers)
        actor = ray.remote(ShardWorker).options(scheduling_strategy="SPREAD")
        self.actors = [actor.remote(folders[i::workers], device, threads) for i in range(workers)]
        try:
            self._get([a.ready.remote() for a in self.actors])
        except BaseException:
            self.close()
            raise

    def score(self, x: np.ndarray, labels: np.ndarray, task: str, query: Query) -> list:
        """Every shard's ``ShardScores``, the target sent to the object store once."""
        ray = self._ray
        x_ref, labels_ref = ray.put(np.ascontiguousarray(x)), ray.put(np.asarray(labels))
        return [part for parts in self._get([a.score.remote(x_ref, labels_ref, task, query) for a in self.actors])
                for part in parts]

    def _get(self, futures: list):
        """``ray.get``, with an actor's typed error raised here as itself (one line in the
        CLI, not Ray's remote traceback) and any other failure as ``IndexStoreError``."""
        ray = self._ray
        try:
            return ray.get(futures)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, EsmIndexError):
                raise cause from None
            raise IndexStoreError(f"a shard worker failed: {_first_line(cause or exc)}") from None
        except ray.exceptions.RayError as exc:
            raise IndexStoreError(f"a shard worker failed: {_first_line(exc)}") from None

    def close(self) -> None:
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []
        if self._started:
            self._ray.shutdown()
            self._started = False


def _first_line(exc: BaseException) -> str:
    """An exception as one line (Ray's messages carry remote tracebacks)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
