"""Agreement with the paper authors' package, hfselect 0.2.1, run for real: the same ESM
files and target texts through ``hfselect.esm_logme.compute_scores`` and through esm-index.
Uses the real packaged MiniLM and a real sample target."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from conftest import random_esms, read_sample
from esm_index.embed import Embedder
from esm_index.esm import ESM
from esm_index.logme import TargetStats, score_esms

hfselect = pytest.importorskip("hfselect")
pytestmark = pytest.mark.slow


def _save_legacy(esm: ESM, folder):
    """hfselect 0.1.0's layout: sequential.0.* tensors, version 0.1.0."""
    folder.mkdir(parents=True)
    save_file({"sequential.0.weight": esm.weight, "sequential.0.bias": esm.bias}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"esm_architecture": "linear", "version": "0.1.0",
                                                    "esm_embedding_dim": esm.in_dim, "task_id": folder.name}))


@pytest.fixture(scope="module")
def esm_folders(tmp_path_factory):
    """Six ESM files: three in the current format, three in the 0.1.0 format."""
    root = tmp_path_factory.mktemp("esms")
    esms = random_esms(np.random.default_rng(0), 6, 384, scale=0.5)
    folders = []
    for i, esm in enumerate(esms):
        folder = root / f"esm{i}"
        esm.save(folder) if i % 2 == 0 else _save_legacy(esm, folder)
        folders.append(folder)
    return folders


@pytest.fixture(scope="module")
def hf_model(minilm_path, tmp_path_factory):
    """MiniLM loaded through a path containing 'sentence-transformers', so hfselect uses
    mean pooling (its rule), as esm-index's default spec does."""
    from transformers import AutoModel, AutoTokenizer

    link = tmp_path_factory.mktemp("m") / "sentence-transformers-all-MiniLM-L6-v2"
    link.symlink_to(minilm_path)
    return AutoModel.from_pretrained(str(link)), AutoTokenizer.from_pretrained(str(link))


def _hfselect_scores(texts, labels, regression, folders, hf_model):
    from datasets import Dataset as HFDataset
    from hfselect.dataset import Dataset
    from hfselect.esm import ESM as HfESM
    from hfselect.esm_logme import compute_scores

    dataset = Dataset(HFDataset.from_dict({"text": texts, "label": labels}), text_col="text", label_col="label",
                      is_regression=regression)
    esms = [HfESM.from_pretrained(str(f)) for f in folders]
    model, tokenizer = hf_model
    return np.asarray(compute_scores(dataset, model, esms, tokenizer, batch_size=64, device_name="cpu"))


def _our_scores(texts, labels, regression, folders, minilm_path):
    x = Embedder(minilm_path).embed(texts)
    esms = [ESM.load(f) for f in folders]
    w = torch.from_numpy(np.stack([e.weight for e in esms]))
    b = torch.from_numpy(np.stack([e.bias for e in esms]))
    return score_esms(TargetStats.from_embeddings(x, np.asarray(labels), regression), w, b)


def test_embeddings_equal_hfselects(minilm_path, hf_model):
    from hfselect.model_utils import get_pooled_output

    texts, _ = read_sample("sms_spam", 40)
    model, tokenizer = hf_model
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt",
                      return_token_type_ids=False)
    with torch.no_grad():
        theirs = get_pooled_output(model, batch["input_ids"], batch["attention_mask"]).numpy()
    np.testing.assert_allclose(Embedder(minilm_path).embed(texts), theirs, atol=2e-5)


def test_classification_scores_match_hfselect(esm_folders, hf_model, minilm_path):
    texts, names = read_sample("news_topics", 150)
    labels = [sorted(set(names)).index(n) for n in names]
    ours = _our_scores(texts, labels, False, esm_folders, minilm_path)
    theirs = _hfselect_scores(texts, labels, False, esm_folders, hf_model)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    assert np.argsort(ours).tolist() == np.argsort(theirs).tolist() or np.ptp(theirs) < 1e-4


def test_scores_match_hfselect_with_more_examples_than_dimensions(esm_folders, hf_model, minilm_path):
    """n > d: the feature-side path, where real MiniLM embeddings are rank-deficient."""
    texts, names = [], []
    for sample in ("movie_reviews", "sms_spam", "news_topics"):
        t, n = read_sample(sample, 150)
        texts += t
        names += n
    labels = [sorted(set(names)).index(n) for n in names]  # 9 classes, 450 examples
    ours = _our_scores(texts, labels, False, esm_folders, minilm_path)
    theirs = _hfselect_scores(texts, labels, False, esm_folders, hf_model)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_regression_scores_match_hfselect(esm_folders, hf_model, minilm_path):
    texts, _ = read_sample("movie_reviews", 200)
    labels = [float(np.log1p(len(t.split()))) for t in texts]  # a real-valued property of real texts
    ours = _our_scores(texts, labels, True, esm_folders, minilm_path)
    theirs = _hfselect_scores(texts, labels, True, esm_folders, hf_model)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
