"""Embedding and fine-tuning with real transformer models: pooling choices, dynamic padding,
and an ESM that really imitates a fine-tuned model (real data, tiny model)."""

import numpy as np
import pytest

from conftest import read_sample
from esm_index.data import encode_labels, LabelledData
from esm_index.embed import Embedder, EmbeddingSpec
from esm_index.finetune import FinetuneConfig, finetune_and_fit


def test_pooling_modes_and_padding(tiny_model):
    texts = ["a short one", "a somewhat longer text that needs more tokens", ("first part", "second part")]
    mean = Embedder(tiny_model, EmbeddingSpec("tiny", "mean"))
    x = mean.embed(texts)
    alone = np.vstack([mean.embed([t]) for t in texts])  # no padding at all
    np.testing.assert_allclose(x, alone, atol=1e-5)
    cls = Embedder(tiny_model, EmbeddingSpec("tiny", "cls")).embed(texts)
    pooler = Embedder(tiny_model, EmbeddingSpec("tiny", "pooler")).embed(texts)
    normed = Embedder(tiny_model, EmbeddingSpec("tiny", "mean", normalize=True)).embed(texts)
    assert not np.allclose(x, cls) and not np.allclose(cls, pooler)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError):
        EmbeddingSpec("tiny", "max")


def test_truncation_to_max_length(tiny_model):
    short = Embedder(tiny_model, EmbeddingSpec("tiny", max_length=8))
    assert np.allclose(short.embed(["abcdefghij" * 3]), short.embed(["abcdefghij" * 5]))


def test_finetuned_model_is_imitated_by_its_esm(tiny_model):
    """Fine-tune a tiny BERT on real SMS spam data, fit the ESM, and check it imitates the
    fine-tuned embeddings on held-out pairs far better than the identity map does."""
    texts, names = read_sample("sms_spam", 300)
    labels, label_names = encode_labels(names, "classification")
    data = LabelledData(texts, labels, "classification", label_names)
    embedder = Embedder(tiny_model, EmbeddingSpec("tiny", max_length=64))
    cfg = FinetuneConfig(max_examples=300, epochs=3, batch_size=16, lr=1e-3, fit_examples=300)
    esm, tuned = finetune_and_fit(embedder, data, cfg)
    fit = esm.meta["fit"]
    assert fit["heldout_mse"] < 0.2 * fit["identity_mse"], fit
    base_x = embedder.embed(texts[:50])
    tuned_x = embedder.with_model(tuned).embed(texts[:50])
    assert np.mean((esm.apply(base_x) - tuned_x) ** 2) < 0.2 * np.mean((base_x - tuned_x) ** 2)
    assert esm.meta["finetune"]["examples"] == 300 and esm.meta["task_type"] == "classification"
