"""ESM files (ours = hfselect's format), the older 0.1.0 format, refusals, and fitting."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from esm_index.errors import InvalidESMError, ModelMismatchError, UnsafeFileError
from esm_index.esm import ESM, fit_ridge, fit_sgd


def _esm(dim=8, seed=0):
    rng = np.random.default_rng(seed)
    return ESM(rng.standard_normal((dim, dim)), rng.standard_normal(dim), {"task_id": "demo", "base_model_name": "m"})


def test_save_load_round_trip(tmp_path):
    esm = _esm()
    loaded = ESM.load(esm.save(tmp_path / "e"))
    np.testing.assert_array_equal(loaded.weight, esm.weight)
    np.testing.assert_array_equal(loaded.bias, esm.bias)
    assert loaded.meta["task_id"] == "demo" and loaded.meta["esm_embedding_dim"] == 8


def test_hfselect_loads_what_we_write_and_computes_the_same_map(tmp_path):
    hf_esm = pytest.importorskip("hfselect.esm")
    esm = _esm(dim=16)
    esm.save(tmp_path / "e")
    theirs = hf_esm.ESM.from_pretrained(str(tmp_path / "e"))
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(theirs(torch.from_numpy(x)).numpy(), esm.apply(x), atol=1e-5)


def test_we_load_what_hfselect_writes(tmp_path):
    hf_esm = pytest.importorskip("hfselect.esm")
    from hfselect.esmconfig import ESMConfig

    theirs = hf_esm.ESM(architecture="linear", embedding_dim=12, config=ESMConfig(task_id="t", base_model_name="m"))
    theirs.save_pretrained(tmp_path / "h")
    ours = ESM.load(tmp_path / "h")
    np.testing.assert_allclose(ours.weight, theirs.model.weight.detach().numpy())
    assert ours.in_dim == 12


def test_legacy_format_without_dimension_infers_it(tmp_path):
    rng = np.random.default_rng(2)
    w, b = rng.standard_normal((10, 10)).astype(np.float32), rng.standard_normal(10).astype(np.float32)
    (tmp_path / "old").mkdir()
    save_file({"sequential.0.weight": w, "sequential.0.bias": b}, str(tmp_path / "old" / "model.safetensors"))
    (tmp_path / "old" / "config.json").write_text(json.dumps({"task_id": "old", "esm_architecture": "linear"}))
    esm = ESM.load(tmp_path / "old")
    assert esm.in_dim == 10
    np.testing.assert_array_equal(esm.weight, w)


def test_pickles_are_refused_unopened(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"\x80\x04 not even opened")
    with pytest.raises(UnsafeFileError, match="pickle"):
        ESM.load(tmp_path / "p")


@pytest.mark.parametrize("tensors,message", [
    ({"model.weight": np.full((4, 4), np.nan, np.float32), "model.bias": np.zeros(4, np.float32)}, "NaN"),
    ({"model.weight": np.zeros((4, 4), np.float32), "model.bias": np.zeros(3, np.float32)}, "bias"),
    ({"other": np.zeros(4, np.float32)}, "expected tensors"),
])
def test_bad_files_are_refused(tmp_path, tensors, message):
    (tmp_path / "bad").mkdir()
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(InvalidESMError, match=message):
        ESM.load(tmp_path / "bad")


def test_unreadable_files_are_refused(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InvalidESMError, match="unreadable"):
        ESM.load(tmp_path / "junk")
    _esm().save(tmp_path / "cfg")
    (tmp_path / "cfg" / "config.json").write_text("{not json")
    with pytest.raises(InvalidESMError, match="JSON"):
        ESM.load(tmp_path / "cfg")


def test_declared_dimension_must_match_the_weights(tmp_path):
    _esm(dim=8).save(tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    (tmp_path / "e" / "config.json").write_text(json.dumps({**cfg, "esm_embedding_dim": 9}))
    with pytest.raises(InvalidESMError, match="dimension"):
        ESM.load(tmp_path / "e")
    with pytest.raises(ModelMismatchError):
        _esm(dim=8).validate(dim=16)


def test_ridge_recovers_a_linear_map_and_beats_identity():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((2000, 16))
    true_w = np.eye(16) + 0.3 * rng.standard_normal((16, 16))
    tuned = base @ true_w.T + 0.5 + 0.01 * rng.standard_normal((2000, 16))
    esm = fit_ridge(base, tuned)
    np.testing.assert_allclose(esm.weight, true_w, atol=0.01)
    np.testing.assert_allclose(esm.bias, 0.5, atol=0.01)
    assert esm.meta["fit"]["heldout_mse"] < 0.01 * esm.meta["fit"]["identity_mse"]


def test_ridge_with_few_pairs_stays_near_identity():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((20, 32))  # fewer pairs than dimensions
    tuned = base + 0.01 * rng.standard_normal((20, 32))
    esm = fit_ridge(base, tuned)
    assert np.abs(esm.weight - np.eye(32)).max() < 0.1


def test_paper_recipe_sgd_learns_the_map():
    rng = np.random.default_rng(5)
    base = rng.standard_normal((3200, 8)).astype(np.float32)
    tuned = 0.5 * base + 0.2
    esm = fit_sgd(base, tuned, epochs=10)  # 1,000 AdamW steps from a random start
    assert esm.meta["fit"]["train_mse"] < 0.05 * float(np.mean(tuned ** 2))
