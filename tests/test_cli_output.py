"""What the CLI shows (issue 8, items 11-16): progress lines outside a terminal, messages
people can read, human tables, a --json that says what was scored, `python -m esm_index`,
--device and --batch-size. Real tiny BERT, real LMDB and FAISS, through CliRunner."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, SAMPLES, cli_json, one_line_error, read_sample
from esm_index.cli import main

SMS = str(SAMPLES / "sms_spam.csv")


@pytest.fixture
def pool(runner, index_dir, esm_dirs):
    assert runner.invoke(main, ["import", str(index_dir), *esm_dirs]).exit_code == 0
    return index_dir


def _rank(pool, target=SMS, *extra):
    return ["rank", str(target), "--index", str(pool), "--text-col", "text", "--label-col", "label", *extra]


def test_slow_steps_print_progress_lines_when_stderr_is_not_a_terminal(runner, pool):
    cold = runner.invoke(main, _rank(pool, SMS, "--json"))
    assert cold.exit_code == 0, cold.output
    assert "esm-index: loading the base model" in cold.stderr and "esm-index: embedding 300 texts" in cold.stderr
    assert cli_json(cold)["results"]  # stdout stays pure JSON
    warm = runner.invoke(main, _rank(pool, SMS))  # cached embeddings: no model, no progress
    assert warm.exit_code == 0 and "loading the base model" not in warm.stderr


def test_messages_read_right(runner, pool, esm_dirs, tmp_path):
    missing = runner.invoke(main, ["rank", SMS, "--index", str(pool), "--label-col", "label"])
    assert "missing option '--text-col'" in one_line_error(missing) and "Error:" not in missing.output
    bad_choice = runner.invoke(main, _rank(pool, SMS, "--task", "ranking"))
    assert "'ranking' is not one of" in one_line_error(bad_choice)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pytorch_model.bin").write_bytes(b"x")
    result = runner.invoke(main, ["import", str(pool), str(broken)])
    error = [line for line in result.output.splitlines() if line.startswith("error:")][0]
    assert error.count(str(broken)) == 1
    one = tmp_path / "one"
    assert "exported 12 ESMs" in runner.invoke(main, ["export", str(pool), str(tmp_path / "all")]).output
    assert runner.invoke(main, ["remove", str(pool), *[f"task{i}" for i in range(1, 12)]]).output.strip() == \
        "removed 11 sources"
    assert "exported 1 ESM to" in runner.invoke(main, ["export", str(pool), str(one)]).output
    assert "ok: 1 source," in runner.invoke(main, ["verify", str(pool)]).output


def test_info_and_list_are_for_people_and_json_for_programs(runner, pool):
    text = runner.invoke(main, ["info", str(pool)]).output
    assert "base model  tiny (32-d, mean pooling" in text and " MB" in text and "{" not in text
    listing = runner.invoke(main, ["list", str(pool)]).output.splitlines()
    assert listing[0].split() == ["name", "task", "language", "examples", "title"]
    assert len(listing) == 14 and listing[-1] == "12 sources"
    assert cli_json(runner.invoke(main, ["info", str(pool), "--json"]))["lmdb_bytes"] > 0


def test_rank_reports_what_it_scored(runner, pool, tmp_path):
    report = cli_json(runner.invoke(main, _rank(pool, SMS, "--json", "--exact")))
    assert report["target"] == {"examples": 300, "task": "classification", "classes": 2, "file": SMS,
                                "task_from": "guessed from the labels"}
    stages = ("faiss_score", "approximate_score", "refining_score")  # null when the stage did not run
    assert all(r[s] is None for r in report["results"] for s in stages)
    text = runner.invoke(main, _rank(pool, SMS, "--top", "1")).output
    assert text.startswith("300 target examples (classification, 2 classes), 12 sources")
    texts, _ = read_sample("movie_reviews", 40)
    floats = tmp_path / "floats.jsonl"
    floats.write_text("".join(json.dumps({"text": t, "label": round(i * 0.37, 2)}) + "\n" for i, t in enumerate(texts)))
    guessed = runner.invoke(main, _rank(pool, floats, "--json"))
    report = cli_json(guessed)
    assert report["target"]["task"] == "regression" and report["target"]["task_from"] == "guessed from the labels"
    assert "taken as regression" in guessed.stderr and "taken as regression" in report["warnings"][0]


def test_device_and_batch_size(runner, pool):
    assert "--device" in runner.invoke(main, ["rank", "--help"]).output
    assert "not a torch device" in one_line_error(runner.invoke(main, _rank(pool, SMS, "--device", "gpu0")))
    assert "--batch-size" in one_line_error(runner.invoke(main, _rank(pool, SMS, "--batch-size", "0")))
    small = runner.invoke(main, _rank(pool, SMS, "--device", "cpu", "--batch-size", "7"))
    assert small.exit_code == 0 and "batches of 7" in small.stderr


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "esm_index", "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "Usage: esm-index" in result.stdout and "rank" in result.stdout
