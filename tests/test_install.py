"""Installing and opening (issue 8, items 7-10): the shipped pool from a wheel's layout, the
base model identified from a local folder or the Hugging Face cache, and manifests that hold
no absolute path of the machine that built them. Real MiniLM, real tiny BERT, real LMDB."""

import shutil
from pathlib import Path

import pytest

from conftest import REPO, one_line_error
from esm_index import cli
from esm_index.cli import main
from esm_index.embed import DEFAULT_MODEL_NAME
from esm_index.index import SourceIndex

FEW_TEXTS = [f"reference text number {i} about films, news and spam" for i in range(24)]


def test_the_pool_a_wheel_carries_is_found_and_a_missing_one_is_named(monkeypatch, tmp_path, runner):
    """pyproject.toml ships indexes/default as esm_index/default_pool; without a checkout
    around the package, that copy is the default. Without either, one line says so."""
    wheel_copy = tmp_path / "site-packages" / "esm_index" / "default_pool"
    shutil.copytree(REPO / "indexes" / "default", wheel_copy, ignore=shutil.ignore_patterns("lock.mdb"))
    monkeypatch.delenv("ESM_INDEX_DEFAULT", raising=False)
    monkeypatch.setattr(cli, "CHECKOUT_POOL", tmp_path / "no-checkout")
    monkeypatch.setattr(cli, "PACKAGED_POOL", wheel_copy)
    assert cli.default_index_path() == wheel_copy
    with SourceIndex(cli.default_index_path(), readonly=True) as pool:
        assert len(pool) == 26
    monkeypatch.setattr(cli, "PACKAGED_POOL", tmp_path / "not-shipped")
    target = str(REPO / "indexes" / "samples" / "sms_spam.csv")
    error = one_line_error(runner.invoke(main, ["rank", target, "--text-col", "text", "--label-col", "label"]))
    assert "default pool is missing" in error and "--index" in error and "init" not in error


def test_the_wheel_declares_the_pool_as_package_data():
    import tomllib

    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"]["esm_index.default_pool"] == "indexes/default"
    for name in setup["package-data"]["esm_index.default_pool"]:
        assert (REPO / "indexes" / "default" / name).is_file()
    assert "tools" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_a_local_copy_of_minilm_is_identified_by_its_output(minilm_path, tmp_path):
    copy = tmp_path / "model"  # the folder name says nothing
    shutil.copytree(minilm_path, copy)
    with SourceIndex.create(tmp_path / "idx", copy, reference_texts=FEW_TEXTS) as index:
        assert index.spec.model_name == DEFAULT_MODEL_NAME
        assert index.manifest["model_path"] is None  # located by name wherever it is opened


def test_an_unknown_model_keeps_its_folder_name_and_a_relative_path(tiny_model, tmp_path, monkeypatch):
    with SourceIndex.create(tmp_path / "idx", tiny_model, reference_texts=FEW_TEXTS) as index:
        assert index.spec.model_name == Path(tiny_model).name
        stored = index.manifest["model_path"]
        assert stored and not Path(stored).is_absolute()
    monkeypatch.chdir(tmp_path.parent)  # resolved against the index folder, not the working directory
    with SourceIndex(tmp_path / "idx", readonly=True) as reopened:
        assert reopened.embedder.model_path.resolve() == Path(tiny_model).resolve()
    # a name given by hand proves nothing: the folder is kept, not swapped for the packaged model
    from esm_index.embed import EmbeddingSpec

    with SourceIndex.create(tmp_path / "named", tiny_model, EmbeddingSpec(DEFAULT_MODEL_NAME),
                            reference_texts=FEW_TEXTS) as named:
        assert named.manifest["model_path"] and named.embedder.dim == 32
    with SourceIndex(tmp_path / "named", readonly=True) as reopened:
        assert reopened.embedder.dim == 32


def test_a_hub_name_in_the_local_cache_works(tiny_model, tmp_path, monkeypatch, runner):
    """`init --model org/name` finds the model in the Hugging Face cache (offline), records
    that name, and a reopened index finds it again by name."""
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--someorg--tiny-bert" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    result = runner.invoke(main, ["init", str(tmp_path / "idx"), "--model", "someorg/tiny-bert"])
    assert result.exit_code == 0 and "for someorg/tiny-bert" in result.output, result.output
    with SourceIndex(tmp_path / "idx", readonly=True) as index:
        assert index.manifest["model_path"] is None
        assert index.embedder.model_path.resolve() == snapshot.resolve()
    missing = runner.invoke(main, ["init", str(tmp_path / "idx2"), "--model", "someorg/not-downloaded"])
    assert "local Hugging Face cache" in one_line_error(missing)
