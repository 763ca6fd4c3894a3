"""What a new user runs into (issue 8): inputs the CLI must refuse with one `error:` line
and exit code 2 before any slow step, and outputs that must not surprise. Real tiny BERT,
real LMDB and FAISS, driven through click's CliRunner."""

import os
import stat

import pytest

from conftest import SAMPLES, cli_json, one_line_error
from esm_index.cli import main

SMS = str(SAMPLES / "sms_spam.csv")


@pytest.fixture
def pool(runner, index_dir, esm_dirs):
    """The tiny index with twelve sources."""
    assert runner.invoke(main, ["import", str(index_dir), *esm_dirs]).exit_code == 0
    return index_dir


def _rank(pool, target, *extra):
    return ["rank", str(target), "--index", str(pool), "--text-col", "text", "--label-col", "label", *extra]


def _write(path, rows, header="text,label"):
    path.write_text(header + "\n" + "".join(f"{t},{label}\n" for t, label in rows))
    return path


def test_add_refuses_an_existing_name_unless_replace(runner, pool):
    add = ["add", str(pool), SMS, "--text-col", "text", "--label-col", "label", "--max-examples", "32",
           "--fit-examples", "64", "--epochs", "1"]
    error = one_line_error(runner.invoke(main, [*add, "--name", "task3"]))
    assert "task3" in error and "--replace" in error
    before = {s["name"]: s for s in cli_json(runner.invoke(main, ["list", str(pool), "--json"]))}
    assert "num_examples" not in before["task3"]  # still the imported source
    result = runner.invoke(main, [*add, "--name", "task3", "--replace", "--language", "de"])
    assert result.exit_code == 0, result.output
    after = {s["name"]: s for s in cli_json(runner.invoke(main, ["list", str(pool), "--json"]))}
    assert len(after) == 12 and after["task3"]["language"] == "de" and after["task3"]["num_examples"] == 300


@pytest.mark.parametrize("option,value", [("--epochs", "0"), ("--max-examples", "0"), ("--fit-examples", "-1"),
                                          ("--steps", "0"), ("--lr", "0")])
def test_add_refuses_options_that_train_nothing(runner, index_dir, option, value):
    result = runner.invoke(main, ["add", str(index_dir), SMS, "--text-col", "text", "--label-col", "label",
                                  option, value])
    assert option in one_line_error(result)


def test_add_refuses_what_rank_refuses(runner, index_dir, tmp_path):
    one_class = _write(tmp_path / "one.csv", [(f"text {i}", "spam") for i in range(40)])
    add = ["add", str(index_dir), str(one_class), "--text-col", "text", "--label-col", "label"]
    assert "single class" in one_line_error(runner.invoke(main, add))
    tiny = _write(tmp_path / "tiny.csv", [("a", "x"), ("b", "y"), ("c", "x")])
    assert "at least" in one_line_error(runner.invoke(main, [*add[:2], str(tiny), *add[3:]]))


def test_tiny_targets_are_refused_and_small_ones_warned(runner, pool, tmp_path):
    three = _write(tmp_path / "three.csv", [("good film", "pos"), ("bad film", "neg"), ("fine film", "pos")])
    assert "at least 20" in one_line_error(runner.invoke(main, _rank(pool, three)))
    rows = [line.rsplit(",", 1) for line in (SAMPLES / "sms_spam.csv").read_text().splitlines()[1:26]]
    small = _write(tmp_path / "small.csv", [(t, label) for t, label in rows])  # 25 examples, 32 dimensions
    result = runner.invoke(main, _rank(pool, small, "--json"))
    report = cli_json(result)
    assert any("32 embedding dimensions" in w for w in report["warnings"])
    assert "warning: the target has 25 examples" in result.stderr
    assert report["target"]["examples"] == 25 and report["target"]["task"] == "classification"


def test_conflicting_or_empty_choices_are_refused(runner, pool, tmp_path):
    assert "--json and --csv" in one_line_error(runner.invoke(main, _rank(pool, SMS, "--json", "--csv")))
    assert "shortlist" in one_line_error(runner.invoke(main, _rank(pool, SMS, "--top", "5", "--shortlist", "2")))
    assert "matches the filters" in one_line_error(runner.invoke(main, _rank(pool, SMS, "--language", "xx")))
    assert "--top" in one_line_error(runner.invoke(main, _rank(pool, SMS, "--top", "0")))
    constant = _write(tmp_path / "constant.csv", [(f"text {i}", "2.5") for i in range(30)])
    assert "constant" in one_line_error(runner.invoke(main, _rank(pool, constant, "--task", "regression")))
    wide = cli_json(runner.invoke(main, _rank(pool, SMS, "--top", "40", "--json")))  # default shortlist grows
    assert len(wide["results"]) == 12


def test_rank_on_an_empty_index_is_refused(runner, index_dir):
    assert "holds no sources" in one_line_error(runner.invoke(main, _rank(index_dir, SMS)))


def test_export_refuses_a_non_empty_folder_and_writes_normal_modes(runner, pool, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "not empty" in one_line_error(runner.invoke(main, ["export", str(pool), str(out)]))
    assert runner.invoke(main, ["export", str(pool), str(out), "--force"]).exit_code == 0
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 13
    umask = os.umask(0)
    os.umask(umask)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (out / "task0").iterdir()}
    assert modes == {0o666 & ~umask}


def test_a_malformed_csv_names_the_real_problem(runner, pool, tmp_path):
    broken = tmp_path / "broken.csv"
    broken.write_text('text,label\n"fine",pos\n"never closed,neg\nthird,pos\n')
    error = one_line_error(runner.invoke(main, _rank(pool, broken)))
    assert "unterminated quote" in error and "labels are empty" not in error
