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


def test_step_budget_is_fixed_and_capped_by_passes(tiny_model):
    """``max_steps`` gives every task the same number of optimizer steps, sampled in reshuffled
    passes, except that a tiny task stops after ``epochs`` passes."""
    from esm_index.finetune import _batches, finetune_with_head, planned_steps

    assert planned_steps(1000, FinetuneConfig(batch_size=32, epochs=3)) == 96  # the paper's 3 epochs
    assert planned_steps(1000, FinetuneConfig(batch_size=32, epochs=10, max_steps=100)) == 100
    assert planned_steps(40, FinetuneConfig(batch_size=32, epochs=10, max_steps=100)) == 20  # 10 passes of 2
    batches = list(_batches(5, 2, 7))
    assert len(batches) == 7
    for start in (0, 3):  # each pass covers every example once
        assert sorted(int(i) for b in batches[start:start + 3] for i in b) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        planned_steps(0, FinetuneConfig())

    texts, names = read_sample("sms_spam", 40)
    labels, label_names = encode_labels(names, "classification")
    embedder = Embedder(tiny_model, EmbeddingSpec("tiny", max_length=32))
    cfg = FinetuneConfig(batch_size=8, epochs=2, max_steps=3, lr=1e-3)
    encoder, head = finetune_with_head(embedder, LabelledData(texts, labels, "classification", label_names), cfg)
    assert not encoder.training and not head.training
    moved = [not np.allclose(a.detach().numpy(), b.detach().numpy())
             for a, b in zip(encoder.parameters(), embedder.model.parameters())]
    assert any(moved)  # a copy was trained; the base encoder is untouched
    assert head[1].out_features == 2


def test_add_defaults_are_the_pool_recipe():
    """`esm-index add` fine-tunes as the shipped pool was built, so added sources compare."""
    from esm_index.cli import add
    from esm_index.finetune import POOL_RECIPE

    defaults = {p.name: p.default for p in add.params}
    assert (defaults["max_examples"], defaults["fit_examples"], defaults["steps"], defaults["epochs"],
            defaults["lr"], defaults["max_length"]) == (POOL_RECIPE.max_examples, POOL_RECIPE.fit_examples,
                                                        POOL_RECIPE.max_steps, POOL_RECIPE.epochs,
                                                        POOL_RECIPE.lr, POOL_RECIPE.max_length)
