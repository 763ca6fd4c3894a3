"""The CLI, driven through click's CliRunner: every command, JSON a program can parse, and
one-line errors with exit code 2 for bad input."""

import numpy as np
import pytest

from conftest import SAMPLES, cli_json, one_line_error, random_esms
from esm_index.cli import main


def test_help_lists_the_commands(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("init", "import", "add", "rank", "info", "list", "remove", "export", "verify", "rebuild"):
        assert command in result.output


def test_import_info_list_rank_export_verify(runner, index_dir, esm_dirs, tmp_path):
    result = runner.invoke(main, ["import", str(index_dir), *esm_dirs])
    assert result.exit_code == 0 and "imported 12" in result.output
    again = runner.invoke(main, ["import", str(index_dir), *esm_dirs])
    assert "imported 0, skipped 12" in again.output

    info = cli_json(runner.invoke(main, ["info", str(index_dir), "--json"]))
    assert info["sources"] == 12 and info["model"] == "tiny" and info["esm_dtype"] == "float16"
    listing = cli_json(runner.invoke(main, ["list", str(index_dir), "--json"]))
    assert sorted(s["name"] for s in listing) == sorted(f"task{i}" for i in range(12))

    target = str(SAMPLES / "sms_spam.csv")
    out = runner.invoke(main, ["rank", target, "--index", str(index_dir), "--text-col", "text", "--label-col", "label",
                               "--top", "3", "--json"])
    assert out.exit_code == 0, out.output
    ranking = cli_json(out)
    assert [r["rank"] for r in ranking["results"]] == [1, 2, 3] and ranking["pool_size"] == 12
    assert ranking["results"][0]["score"] >= ranking["results"][1]["score"] and "exact" in ranking["timings"]

    # Through the prefilter: stage sizes below the pool's 12 sources, so that the FAISS,
    # approximate and refining stages all run (the default shortlist of 32 would score all 12
    # exactly); the exact top-1 survives them.
    staged = cli_json(runner.invoke(main, ["rank", target, "--index", str(index_dir), "--text-col", "text",
                                             "--label-col", "label", "--top", "3", "--shortlist", "3",
                                             "--candidates", "8", "--refine", "5", "--json"]))
    exact = cli_json(runner.invoke(main, ["rank", target, "--index", str(index_dir), "--text-col", "text",
                                            "--label-col", "label", "--top", "12", "--exact", "--json"]))
    stages = {"faiss", "approximate", "refining"}
    assert stages <= set(staged["timings"]) and not stages & set(exact["timings"])
    assert exact["results"][0]["source"] == staged["results"][0]["source"] == ranking["results"][0]["source"]
    french = cli_json(runner.invoke(main, ["rank", target, "--index", str(index_dir), "--text-col", "text",
                                             "--label-col", "label", "--language", "fr", "--json"]))
    assert french["pool_size"] == 6 and all(r["meta"]["language"] == "fr" for r in french["results"])
    csv_out = runner.invoke(main, ["rank", target, "--index", str(index_dir), "--text-col", "text",
                                   "--label-col", "label", "--top", "2", "--csv"]).stdout.splitlines()
    assert csv_out[0].startswith("rank,source,score") and len(csv_out) == 3

    assert runner.invoke(main, ["export", str(index_dir), str(tmp_path / "out")]).exit_code == 0
    assert len(list((tmp_path / "out").iterdir())) == 12
    assert runner.invoke(main, ["verify", str(index_dir)]).exit_code == 0
    assert runner.invoke(main, ["remove", str(index_dir), "task0"]).exit_code == 0
    assert cli_json(runner.invoke(main, ["info", str(index_dir), "--json"]))["sources"] == 11
    (index_dir / "prefilter.faiss").unlink()
    assert runner.invoke(main, ["verify", str(index_dir)]).exit_code == 1
    assert runner.invoke(main, ["rebuild", str(index_dir)]).exit_code == 0
    assert runner.invoke(main, ["verify", str(index_dir)]).exit_code == 0


def test_bad_inputs_give_one_line_and_exit_2(runner, index_dir, esm_dirs, tmp_path):
    rank = ["rank", "--index", str(index_dir), "--text-col", "text", "--label-col", "label"]
    assert "no such file" in one_line_error(runner.invoke(main, [rank[0], str(tmp_path / "none.csv"), *rank[1:]]))
    single = tmp_path / "single.csv"
    single.write_text("text,label\na,x\nb,x\n")
    assert "single class" in one_line_error(runner.invoke(main, [rank[0], str(single), *rank[1:]]))
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    assert "no rows" in one_line_error(runner.invoke(main, [rank[0], str(empty), *rank[1:]]))
    words = tmp_path / "words.csv"
    words.write_text("text,label\na,high\nb,low\n")
    assert "numbers" in one_line_error(runner.invoke(main, [rank[0], str(words), *rank[1:], "--task", "regression"]))
    wrong_col = runner.invoke(main, ["rank", str(single), "--index", str(index_dir), "--text-col", "body", "--label-col", "label"])
    assert "no column 'body'" in one_line_error(wrong_col)
    not_index = runner.invoke(main, ["rank", str(single), "--index", str(tmp_path), "--text-col", "text", "--label-col", "label"])
    assert "not an esm-index index" in one_line_error(not_index)

    nan_dir = tmp_path / "nan"
    from safetensors.numpy import save_file
    nan_dir.mkdir()
    save_file({"model.weight": np.full((32, 32), np.nan, np.float32), "model.bias": np.zeros(32, np.float32)},
              str(nan_dir / "model.safetensors"))
    pickle_dir = tmp_path / "pkl"
    pickle_dir.mkdir()
    (pickle_dir / "pytorch_model.bin").write_bytes(b"x")
    result = runner.invoke(main, ["import", str(index_dir), esm_dirs[0], str(nan_dir), str(pickle_dir)])
    assert result.exit_code == 2 and "imported 1" in result.output
    assert "NaN" in result.output and "pickle" in result.output and "Traceback" not in result.output

    wrong_dim = tmp_path / "wide"
    random_esms(np.random.default_rng(1), 1, 48)[0].save(wrong_dim)
    result = runner.invoke(main, ["import", str(index_dir), str(wrong_dim), *esm_dirs[1:3]])
    assert result.exit_code == 2 and "imported 2" in result.output and "48-dimensional" in result.output


def test_add_fine_tunes_and_adds_a_source(runner, index_dir):
    """`add` on real data (a slice of the SMS sample) with the tiny model: a new source with
    its metadata, and a fit that beats the identity map."""
    result = runner.invoke(main, ["add", str(index_dir), str(SAMPLES / "sms_spam.csv"), "--text-col", "text",
                                  "--label-col", "label", "--name", "sms", "--language", "en", "--tag", "spam",
                                  "--max-examples", "64", "--fit-examples", "200", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "added sms" in result.output
    (source,) = cli_json(runner.invoke(main, ["list", str(index_dir), "--json"]))
    assert source["name"] == "sms" and source["language"] == "en" and source["tags"] == ["spam"]
    assert source["label_names"] == ["ham", "spam"] and source["num_examples"] == 300


def test_add_takes_the_pools_recipe_and_warns_of_another(runner, index_dir):
    """An unset recipe option takes the pool's own recipe, read from its sources' metadata,
    so that an added source scores on the same footing; an explicit other one is warned of,
    and `info` shows the pool's recipe until the pool is mixed."""
    add = ["add", str(index_dir), str(SAMPLES / "sms_spam.csv"), "--text-col", "text", "--label-col", "label",
           "--fit-examples", "100"]
    first = runner.invoke(main, [*add, "--name", "a", "--steps", "3", "--lr", "1e-4"])
    assert first.exit_code == 0, first.output
    assert "recipe: 3 steps of 32 (at most 10 passes), lr 0.0001" in first.output and "pool's" not in first.output
    second = runner.invoke(main, [*add, "--name", "b"])
    assert second.exit_code == 0 and "warning" not in second.output, second.output
    assert "recipe: 3 steps of 32 (at most 10 passes), lr 0.0001, weight decay 0.01, 64 tokens (the pool's)" \
        in second.output
    assert cli_json(runner.invoke(main, ["info", str(index_dir), "--json"]))["recipe"].startswith("3 steps")
    third = runner.invoke(main, [*add, "--name", "c", "--steps", "4"])
    assert third.exit_code == 0 and "warning: the pool's sources were made with 3 steps" in third.output
    assert cli_json(runner.invoke(main, ["info", str(index_dir), "--json"]))["recipe"] is None


def test_only_esm_index_itself_counts_its_process_age_as_start_up(monkeypatch):
    """``timings.startup`` is the process's age for the console script and ``python -m
    esm_index(.cli)``, but not for a host that runs the CLI, such as ``python -m pytest``
    (whose argv[0] is also a __main__.py): there the command's own time starts at zero."""
    import sys
    from pathlib import Path

    import esm_index.cli as cli

    package = Path(cli.__file__).resolve().parent
    for argv0, itself in [("/usr/local/bin/esm-index", True), (str(package / "__main__.py"), True),
                          (str(package / "cli.py"), True), (str(Path(pytest.__file__).parent / "__main__.py"), False),
                          ("ipykernel_launcher.py", False)]:
        monkeypatch.setattr(sys, "argv", [argv0])
        assert cli._is_the_command() is itself, argv0
