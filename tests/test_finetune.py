"""Embedding and fine-tuning with real transformer models: pooling choices, dynamic padding,
and an ESM that really imitates a fine-tuned model (real data, tiny model)."""

from pathlib import Path

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


def test_probe_head_is_the_linear_probe_of_the_starting_features(tiny_model):
    """LP-FT: ``fit_probe_head`` fits the convex probe (logistic or ridge), and
    ``finetune_with_head(probe_head=True)`` starts from the probe of the very features the
    fine-tuning feeds the head (same encoder, pooling and token limit)."""
    import torch

    from esm_index.finetune import finetune_with_head, fit_probe_head

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(300, 8)).astype(np.float32))
    y = (x[:, 0] - 2 * x[:, 3] > 0).long()
    linear = torch.nn.Linear(8, 2)
    fit_probe_head(linear, x, y, regression=False)
    assert float((linear(x).argmax(1) == y).float().mean()) > 0.97
    target = x @ torch.tensor([[1.0], [0], [0], [-2], [0], [0], [0], [0.5]]) + 3
    ridge = torch.nn.Linear(8, 1)
    fit_probe_head(ridge, x, target, regression=True, l2=0.0)
    np.testing.assert_allclose(ridge.weight.detach().numpy().ravel(), [1, 0, 0, -2, 0, 0, 0, 0.5], atol=1e-4)
    np.testing.assert_allclose(float(ridge.bias.detach()), 3.0, atol=1e-4)

    texts, names = read_sample("sms_spam", 60)
    labels, label_names = encode_labels(names, "classification")
    data = LabelledData(texts, labels, "classification", label_names)
    embedder = Embedder(tiny_model, EmbeddingSpec("tiny", max_length=32))
    cfg = FinetuneConfig(batch_size=8, epochs=1, max_steps=1, lr=1e-12, max_length=16)  # a step that moves nothing
    _, head = finetune_with_head(embedder, data, cfg, probe_head=True)
    expected = torch.nn.Linear(embedder.dim, 2)
    feats = Embedder(tiny_model, EmbeddingSpec("tiny", max_length=16)).embed(texts)  # the fine-tuning's limit
    fit_probe_head(expected, torch.from_numpy(feats), torch.as_tensor(labels), regression=False)
    _, random_head = finetune_with_head(embedder, data, cfg)

    def probs(linear):
        with torch.no_grad():
            return torch.softmax(linear(torch.from_numpy(feats)), 1).numpy()

    # the same fit up to float noise (which an ill-conditioned probe amplifies in W, not in its output)
    np.testing.assert_allclose(probs(head[1]), probs(expected), atol=2e-3)
    assert np.abs(probs(random_head[1]) - probs(expected)).max() > 0.1


def test_the_pool_recipe_is_read_back_from_the_sources_metadata():
    """A pool's recipe comes back from what its sources recorded, in both records' shapes:
    build_pool's (steps got, lowered by the pass cap for a small task) and add's (the config);
    a pool of mixed recipes, or records of another shape, give None rather than a guess."""
    from dataclasses import asdict

    from esm_index.finetune import POOL_RECIPE, planned_steps, pool_recipe, same_movement
    from esm_index.index import SourceIndex

    def built(n, steps, lr=5e-5):  # tools/build_pool.py's record
        return {"num_examples": n, "finetune": {"steps": steps, "batch_size": 32, "lr": lr, "weight_decay": 0.01,
                                                "max_length": 64, "max_passes": 10, "seed": 0}}

    def added(n, cfg):  # finetune_and_fit's record
        return {"finetune": {**asdict(cfg), "examples": n, "steps": planned_steps(n, cfg)}}

    shipped = SourceIndex(Path(__file__).parent.parent / "indexes" / "default", readonly=True)
    assert same_movement(shipped.pool_recipe(), POOL_RECIPE)  # 26 real records, some pass-capped
    r300 = pool_recipe([built(78, 30), built(5000, 300), built(896, 280)])
    assert r300.max_steps == 300 and r300.epochs == 10 and r300.lr == 5e-5
    assert same_movement(pool_recipe([built(5000, 300), added(400, r300), {"name": "hfselect, no record"}]), r300)
    assert pool_recipe([built(5000, 100), built(5000, 100, lr=2e-5)]) is None  # two learning rates
    assert pool_recipe([built(5000, 100), built(800, 200)]) is None  # 800 rows would have got 100 steps
    assert pool_recipe([{"finetune": "junk"}, {"finetune": {"steps": "x", "max_passes": 1}}, {}]) is None
