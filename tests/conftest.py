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


# ---- the CLI, through click's CliRunner ---------------------------------------------------
@pytest.fixture
def runner():
    from click.testing import CliRunner

    return CliRunner()


@pytest.fixture
def index_dir(tmp_path, tiny_model, runner):
    """An empty index for the tiny model, made by ``esm-index init``."""
    from esm_index.cli import main

    folder = tmp_path / "idx"
    result = runner.invoke(main, ["init", str(folder), "--model", str(tiny_model), "--model-name", "tiny"])
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture
def esm_dirs(tmp_path):
    """Twelve hfselect ESM folders for the tiny model, six "en" and six "fr"."""
    folders = []
    for i, esm in enumerate(random_esms(np.random.default_rng(0), 12, 32, scale=1.0)):
        esm.meta.update({"task_id": f"task{i}", "base_model_name": "tiny", "language": "en" if i < 6 else "fr"})
        folders.append(str(esm.save(tmp_path / "esms" / f"e{i}")))
    return folders


def cli_json(result):
    """The parsed stdout of a command that succeeded."""
    import json

    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_line_error(result):
    """The single ``error:`` line of a command refused with exit code 2 (and no traceback)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]
