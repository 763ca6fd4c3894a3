"""Shared fixtures: a tiny in-process BERT for fast unit tests, the real packaged MiniLM and
the real sample targets shipped in indexes/samples for the end-to-end tests."""

from __future__ import annotations

import os
import string
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "indexes" / "samples"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Each test gets its own embedding cache, so no test sees another's results."""
    import esm_index.index as index_module

    monkeypatch.setattr(index_module, "CACHE_DIR", tmp_path / "cache")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, 32-d BERT with a character-level WordPiece vocabulary, saved as a folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=160)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from esm_index.embed import default_model_path

    return default_model_path()


def read_sample(name: str, limit: int | None = None):
    """Texts and string labels of a shipped sample target (real data)."""
    from esm_index.data import read_table

    rows = read_table(SAMPLES / f"{name}.csv")[:limit]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def random_esms(rng: np.random.Generator, count: int, dim: int, scale: float = 0.1):
    """Maps near the identity, like ESMs of light fine-tuning."""
    from esm_index.esm import ESM

    return [ESM(np.eye(dim) + rng.standard_normal((dim, dim)) * scale / np.sqrt(dim),
                rng.standard_normal(dim) * scale) for _ in range(count)]
