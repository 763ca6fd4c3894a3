"""``esm-index``: a thin click shell over ``SourceIndex``.

Heavy imports (torch, transformers, faiss) happen inside commands, so ``--help`` is instant.
Every ``EsmIndexError`` (and an unreadable file) becomes one line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import wraps
from pathlib import Path

import click

from .display import (METHOD_NAMES, RANKING_COLUMNS, SOURCE_COLUMNS, Group, fail as _fail, info_lines, model_options,
                      output, output_options, query_options, ranking_rows, ranking_table, show_progress, source_table,
                      target_kind)
from .errors import EsmIndexError, IndexStoreError, plural
from .results import DEFAULT_SHORTLIST, Filters

COMMAND_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                       "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # no "Loading weights" bars in CLI output
"""Set (unless already set) when a command starts: the CLI never reaches the network."""
_command_started = time.perf_counter()  # reset when a command starts; see _command_seconds
_startup_offset: float | None = None  # the process's age when the command began (set once per command)

CHECKOUT_POOL = Path(__file__).resolve().parent.parent / "indexes" / "default"  # a source checkout
PACKAGED_POOL = Path(__file__).resolve().parent / "default_pool"  # the wheel's copy (pyproject.toml)


def friendly(fn):
    """Turn our typed errors (and unreadable files) into one line and exit code 2."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EsmIndexError as exc:
            _fail(str(exc))
        except OSError as exc:
            _fail(f"{exc.__class__.__name__}: {exc}")
    return wrapper


def _open(folder, readonly: bool = False, device: str | None = None, batch_size: int = 64, **shard_options):
    """A ``SourceIndex``, or a ``ShardedIndex`` for a folder with a shard manifest (shards.py)."""
    from .checks import check_positive
    from .shards import open_index

    check_positive(**{"--batch-size": batch_size})
    return open_index(folder, readonly=readonly, device=device, batch_size=batch_size, **shard_options)


def default_index_path() -> Path:
    """The shipped pool: $ESM_INDEX_DEFAULT, else indexes/default of the checkout this
    package runs from (an editable install), else the copy a wheel carries inside the
    package. A missing pool is reported here, not as "not an index; run init"."""
    if os.environ.get("ESM_INDEX_DEFAULT"):
        return Path(os.environ["ESM_INDEX_DEFAULT"])
    for folder in (CHECKOUT_POOL, PACKAGED_POOL):
        if (folder / "store.lmdb").is_dir():
            return folder
    raise IndexStoreError(f"the shipped default pool is missing (looked in {CHECKOUT_POOL} and {PACKAGED_POOL}); "
                          f"pass --index DIR or set ESM_INDEX_DEFAULT")


@click.group(cls=Group)
@click.version_option(package_name="esm-index")
def main() -> None:
    """Rank public source datasets for intermediate-task transfer to your target task
    (ESM-LogME, Schulte et al., EMNLP 2024), from a vector-index-backed pool."""
    global _command_started, _startup_offset
    _command_started, _startup_offset = time.perf_counter(), None
    for name, value in COMMAND_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    show_progress()  # slow steps print a line on stderr, in a terminal or not


def _command_seconds() -> float:
    """Wall seconds of this command, start-up included. When this process is the command
    (the console script, or python -m esm_index / esm_index.cli) that is its whole age,
    interpreter and imports too; inside a host process (a test's CliRunner, a notebook), the
    time since the command began. The age before the command body comes from /proc once (in
    clock ticks, 10 ms); every later reading adds perf_counter time to it, so the timings
    that follow add up exactly."""
    global _startup_offset
    since_command = time.perf_counter() - _command_started
    if _startup_offset is None:
        _startup_offset = max(_process_age(since_command) - since_command, 0.0) if _is_the_command() else 0.0
    return _startup_offset + since_command


def _is_the_command() -> bool:
    """Whether this process was started as esm-index (not a host that runs it, like pytest)."""
    here = Path(__file__).resolve().parent
    started = Path(sys.argv[0])
    return started.name == "esm-index" or started.resolve() in (here / "cli.py", here / "__main__.py")


def _process_age(fallback: float) -> float:
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = float(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            return float(fh.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return fallback


@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--model", "model_path", default=None,
              help="Base model: a local folder, or a hub name in the local Hugging Face cache "
                   "(default: the packaged all-MiniLM-L6-v2).")
@click.option("--model-name", default=None,
              help="Public name recorded in the manifest (default: identified from the model, else its folder name).")
@click.option("--pooling", type=click.Choice(["mean", "cls", "pooler"]), default="mean", show_default=True)
@click.option("--normalize/--no-normalize", default=False, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True)
@click.option("--dtype", "esm_dtype", type=click.Choice(["float16", "float32", "float16-factor"]), default="float16",
              show_default=True, help="How ESMs are stored: float16-factor is half the size of float16, "
                                      "the same scores, a rotated map (README, Storage).")
@click.option("--probe-dim", type=int, default=128, show_default=True,
              help="Prefilter summary size k (k(k+1)/2 floats; capped at d+1).")
@model_options
@friendly
def init(folder, model_path, model_name, pooling, normalize, max_length, esm_dtype, probe_dim, device, batch_size):
    """Create an empty index for one base model and pooling."""
    from .checks import check_positive
    from .embed import DEFAULT_MODEL_NAME, EmbeddingSpec
    from .index import SourceIndex

    spec = EmbeddingSpec(model_name or ("" if model_path else DEFAULT_MODEL_NAME), pooling, normalize, max_length)
    check_positive(**{"--batch-size": batch_size, "--max-length": max_length, "--probe-dim": probe_dim})
    with SourceIndex.create(folder, model_path, spec, esm_dtype=esm_dtype, probe_dim=probe_dim, device=device,
                            batch_size=batch_size) as index:
        click.echo(f"created {folder} for {index.spec.model_name} ({index.manifest['dim']}-d, {pooling} pooling)")


@main.command("import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("esm_folders", nargs=-1, required=True, type=click.Path())
@click.option("--name-from", type=click.Choice(["config", "folder"]), default="config", show_default=True,
              help="Source name: the ESM config's task_id[:subset], or the folder name.")
@friendly
def import_(folder, esm_folders, name_from):
    """Import hfselect ESM folders in bulk (resumable: present names are skipped)."""
    from tqdm.auto import tqdm

    from .esm import ESM

    failures = []

    def items(index):
        for path in tqdm(esm_folders, desc="importing", unit="ESM", disable=not sys.stderr.isatty()):
            try:
                esm = ESM.load(path)
                index.check_esm(esm)
            except EsmIndexError as exc:
                failures.append(str(exc) if str(path) in str(exc) else f"{path}: {exc}")  # once, not twice
                continue
            yield _source_name(esm.meta, Path(path), name_from), esm

    with _open(folder) as index:
        added, skipped = index.add_esms(items(index))
        index.rebuild()
    click.echo(f"imported {added}, skipped {skipped} already present, {len(failures)} failed; "
               f"{folder} holds {added + skipped} of them")
    if failures:
        for line in failures:
            click.echo(f"error: {line}", err=True)
        sys.exit(2)


def _source_name(meta: dict, path: Path, name_from: str) -> str:
    if name_from == "config" and meta.get("task_id"):
        return meta["task_id"] + (f":{meta['task_subset']}" if meta.get("task_subset") else "")
    return path.resolve().name


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("data_file", type=click.Path())
@click.option("--text-col", "text_cols", multiple=True, required=True)
@click.option("--label-col", "label_cols", multiple=True, required=True)
@click.option("--task", type=click.Choice(["classification", "regression"]), default=None)
@click.option("--name", default=None, help="Source name (default: the file's stem).")
@click.option("--language", default=None)
@click.option("--tag", "tags", multiple=True)
# Unset options take the pool's own recipe (SourceIndex.pool_recipe, from its sources'
# metadata), else the shipped pool's (finetune.POOL_RECIPE), so that an added source scores
# on the same footing as the others.
@click.option("--max-examples", type=int, default=None, help="Fine-tuning sample cap [default: 10000].")
@click.option("--fit-examples", type=int, default=None, help="Texts used to fit the ESM [default: 1500].")
@click.option("--steps", type=int, default=None, help="Optimizer steps (batch 32) [default: the pool's, else 100].")
@click.option("--epochs", type=int, default=None, help="At most this many passes [default: the pool's, else 10].")
@click.option("--lr", type=float, default=None, help="AdamW learning rate [default: the pool's, else 5e-5].")
@click.option("--max-length", type=int, default=None, help="Fine-tuning truncation in tokens [default: the pool's, else 64].")
@click.option("--replace", is_flag=True, help="Overwrite a source of the same name (otherwise refused).")
@model_options
@friendly
def add(folder, data_file, text_cols, label_cols, task, name, language, tags, max_examples, fit_examples, steps,
        epochs, lr, max_length, replace, device, batch_size):
    """Fine-tune the base model on a labelled file, fit its ESM, add it as a source.

    Unset recipe options take the pool's own recipe, so the new source is comparable."""
    import dataclasses

    from .checks import check_positive
    from .data import load_labelled
    from .finetune import POOL_RECIPE, describe_recipe, same_movement

    check_positive(**{"--max-examples": max_examples, "--fit-examples": fit_examples, "--epochs": epochs,
                      "--steps": steps, "--max-length": max_length})
    if lr is not None and not lr > 0:
        _fail(f"--lr must be above 0, not {lr}")
    given = {field: value for field, value in (("max_examples", max_examples), ("fit_examples", fit_examples),
                                               ("epochs", epochs), ("max_steps", steps), ("lr", lr),
                                               ("max_length", max_length)) if value is not None}
    data = load_labelled(data_file, text_cols, label_cols, task)
    name = name or Path(data_file).stem
    with _open(folder, device=device, batch_size=batch_size) as index:
        pool = index.pool_recipe()
        cfg = dataclasses.replace(pool or POOL_RECIPE, **given)

        def announce(used) -> None:  # once the inputs are accepted, before minutes of fine-tuning
            click.echo(f"recipe: {describe_recipe(used)}" + (" (the pool's)" if pool and same_movement(used, pool)
                                                            else ""), err=True)
            if pool and not same_movement(used, pool):
                click.echo(f"warning: the pool's sources were made with {describe_recipe(pool)}; a source "
                           "fine-tuned differently does not score on the same footing", err=True)

        esm = index.add_dataset(data, name, cfg, progress=sys.stderr.isatty(), replace=replace,
                                meta={"language": language, "tags": list(tags),
                                      "provenance": str(Path(data_file).resolve())}, announce=announce)
        index.rebuild()
    fit = esm.meta["fit"]
    click.echo(f"added {name}: held-out fit mse {fit['heldout_mse']:.3g} (identity map {fit['identity_mse']:.3g})")


@main.command()
@click.argument("target_file", type=click.Path())
@click.option("--index", "folder", type=click.Path(), default=None, help="Index folder (default: the shipped pool).")
@click.option("--text-col", "text_cols", multiple=True, required=True)
@click.option("--label-col", "label_cols", multiple=True, required=True)
@click.option("--task", type=click.Choice(["classification", "regression"]), default=None)
@click.option("--top", type=int, default=10, show_default=True)
@query_options
@output_options
@click.option("--server", envvar="ESM_INDEX_SERVER", default=None, metavar="URL",
              help="Send the query to a running 'esm-index serve' (env ESM_INDEX_SERVER; token from "
                   "ESM_INDEX_TOKEN); --index then names a served index or its folder.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Sharded index: Ray actors over its shards (0: the shards in this process; default: "
                   "one per shard with --ray-address, else 0).")
@click.option("--ray-address", default=None, metavar="ADDRESS", help="Sharded index: a running Ray cluster.")
@model_options
@friendly
def rank(target_file, folder, text_cols, label_cols, task, top, shortlist, candidates, refine, exact, method,
         f_task, f_language, f_tags, min_size, fmt, server, workers, ray_address, device, batch_size):
    """Rank the pool's sources for a labelled target file (CSV, TSV, JSONL, JSON or Parquet)."""
    options = dict(top=top, exact=exact, shortlist=shortlist or max(DEFAULT_SHORTLIST, top), candidates=candidates,
                   refine=refine, filters=Filters(f_task, f_language, f_tags, min_size), method=method)
    startup = _command_seconds()
    if server:
        if device is not None or batch_size != 64 or workers is not None or ray_address:
            _fail("--device, --batch-size, --workers and --ray-address apply to local mode; with --server the "
                  "server's own settings hold")
        ranking = _rank_remote(server, folder, target_file, text_cols, label_cols, task, options)
    else:
        from .checks import check_labels, check_positive, check_size
        from .data import load_labelled

        check_positive(**{"--top": top, "--shortlist": shortlist, "--candidates": candidates, "--refine": refine})
        data = load_labelled(target_file, text_cols, label_cols, task)
        folder = folder or default_index_path()
        with _open(folder, readonly=True, device=device, batch_size=batch_size, workers=workers,
                   ray_address=ray_address) as index:
            if not len(index):  # before embedding the target, but after what is wrong with the target
                check_labels(data.labels, data.task, len(data.texts))
                check_size(len(data))
                _fail(f"the index {folder} holds no sources (add some with 'esm-index import' or 'add')")
            ranking = index.rank(data.texts, data.labels, data.task,
                                 progress=sys.stderr.isatty() and fmt == "table", **options)
    if not ranking.pool_size:
        _fail(f"the index {folder or 'served'} holds no sources (add some with 'esm-index import' or 'add')")
    ranking.target.update({"file": str(target_file), "task_from": "--task" if task else "guessed from the labels"})
    if not task and ranking.target.get("task") == "regression":
        ranking.warnings.insert(0, "the labels are numbers with fractions, so they were taken as regression "
                                   "targets (--task classification overrides)")
    total = _command_seconds()  # the whole command: start-up, reading, the query (or its round trip)
    ranking.timings = {"startup": round(startup, 4), **ranking.timings,
                       "other": round(max(total - startup - sum(ranking.timings.values()), 0.0), 4),
                       "total": round(total, 4)}
    for line in ranking.warnings:
        click.echo(f"warning: {line}", err=True)
    header = (f"{plural(ranking.target['examples'], 'target example')} ({target_kind(ranking.target)}), "
              f"{plural(ranking.pool_size, 'source')}, ranked by {METHOD_NAMES[ranking.method]}, "
              f"{ranking.timings['total']:.2f} s")
    output(fmt, ranking.to_dict(), RANKING_COLUMNS, ranking_rows(ranking.results),
           [header, *ranking_table(ranking.results)])


def _rank_remote(url: str, folder, target_file, text_cols, label_cols, task, options: dict):
    """The same query, sent to a running server: the file is read here (no numpy, no torch),
    the labels are encoded there exactly as load_labelled encodes them."""
    from .client import Client
    from .tables import read_target

    texts, columns = read_target(target_file, text_cols, label_cols)
    labels = columns[0] if len(columns) == 1 else [list(row) for row in zip(*columns)]
    return Client(url, index=str(folder) if folder else None).rank(texts, labels, task, **options)


@main.command()
@click.option("--index", "indexes", multiple=True, metavar="[NAME=]DIR",
              help="An index to serve (repeatable; default: the shipped pool, as 'default').")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback needs --token.")
@click.option("--port", type=int, default=8765, show_default=True)
@click.option("--token", envvar="ESM_INDEX_TOKEN", default=None,
              help="Bearer token clients must send (env ESM_INDEX_TOKEN, which keeps it out of 'ps').")
@click.option("--workers", type=int, default=2, show_default=True, help="Queries computed at once; more wait.")
@click.option("--threads-per-query", type=int, default=None,
              help="numba / FAISS threads inside one query (default: the cores shared among the queries "
                   "running at the time, so a lone query gets them all; 0: the libraries' default).")
@click.option("--max-body-mb", type=float, default=64.0, show_default=True)
@click.option("--max-rows", type=int, default=20_000, show_default=True, help="Rows per target.")
@click.option("--max-targets", type=int, default=64, show_default=True, help="Targets per request.")
@click.option("--no-warm", is_flag=True, help="Skip loading the model and compiling kernels before serving.")
@friendly
def serve(indexes, host, port, token, workers, threads_per_query, max_body_mb, max_rows, max_targets, no_warm):
    """Serve indexes over HTTP with JSON, keeping the model and prefilters warm (see server.py)."""
    # Before numpy loads: no transparent-huge-page advice on large arrays. A query allocates
    # tens of MB of maps afresh, and the kernel compacting memory for huge pages on first
    # touch set the tail, worst right after an embedding (BENCHMARKS.md §7)
    os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
    from .checks import check_positive
    from .server import Limits, serve as run_server

    check_positive(**{"--workers": workers, "--max-rows": max_rows, "--max-targets": max_targets,
                      "--max-body-mb": max_body_mb})
    folders = {}
    for spec in indexes or [f"default={default_index_path()}"]:
        name, _, path = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
        if not (Path(path) / "store.lmdb").exists():
            _fail(f"{path}: not an index folder (no store.lmdb)")
        folders[name] = Path(path)
    if threads_per_query is not None and threads_per_query < 0:
        _fail(f"--threads-per-query must be 0 or more, not {threads_per_query}")
    run_server(folders, host, port, token, Limits(max_body_mb, max_rows, max_targets, workers, threads_per_query),
               warm=not no_warm)


@main.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--shards", type=click.IntRange(min=1), default=4, show_default=True)
@friendly
def shard(source, out, shards):
    """Split an index into index folders under OUT, with the manifest 'rank --index OUT' reads."""
    from .shards import ShardedIndex

    with ShardedIndex.split(source, out, shards, readonly=True) as index:
        sizes = index.info()["shards"]
    click.echo(f"split {plural(sum(sizes.values()), 'source')} into {plural(shards, 'shard')} under {out}: "
               + ", ".join(f"{name} {count}" for name, count in sizes.items()))


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@output_options
@friendly
def info(folder, fmt):
    """The index's manifest and size."""
    with _open(folder, readonly=True) as index:
        data = index.info()
    flat = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in data.items()}
    output(fmt, data, list(flat), [list(flat.values())], info_lines(data, str(folder)))


@main.command("list")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@output_options
@friendly
def list_(folder, fmt):
    """The sources in the index."""
    with _open(folder, readonly=True) as index:
        sources = index.sources()
    output(fmt, [{k: v for k, v in s.items() if k not in ("fit", "finetune")} for s in sources], SOURCE_COLUMNS,
           [[s.get(c) or "" for c in SOURCE_COLUMNS] for s in sources], source_table(sources))


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("names", nargs=-1, required=True)
@friendly
def remove(folder, names):
    """Remove sources by name."""
    with _open(folder) as index:
        missing = index.remove(names)
        index.rebuild()
    if missing:
        _fail(f"no source named {', '.join(missing)}")
    click.echo(f"removed {plural(len(names), 'source')}")


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["hfselect"]), default="hfselect", show_default=True)
@click.option("--force", is_flag=True, help="Write into a folder that is not empty.")
@friendly
def export(folder, out, fmt, force):
    """Write every source as an ESM folder hfselect can load."""
    with _open(folder, readonly=True) as index:
        count = index.export(out, force=force)
    click.echo(f"exported {plural(count, 'ESM')} to {out}")


@main.command("map")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("target_file", required=False, type=click.Path())
@click.option("--out", default="pool_map.png", show_default=True, help="Picture file (.png, .svg or .pdf).")
@click.option("--color-by", type=click.Choice(["language", "task_type"]), default="language", show_default=True)
@click.option("--text-col", "text_cols", multiple=True, default=("text",), show_default=True)
@click.option("--label-col", "label_cols", multiple=True, default=("label",), show_default=True)
@click.option("--task", type=click.Choice(["classification", "regression"]), default=None)
@click.option("--top", type=int, default=10, show_default=True, help="Sources of the target's ranking to mark.")
@model_options
@friendly
def map_(folder, target_file, out, color_by, text_cols, label_cols, task, top, device, batch_size):
    """Draw the pool, sources placed by their maps; with a target, its top sources and scores."""
    from .pool_map import draw, pool_coordinates

    data = ranking = None
    if target_file:
        from .data import load_labelled

        data = load_labelled(target_file, text_cols, label_cols, task)
    with _open(folder, readonly=True, device=device, batch_size=batch_size) as index:
        pool = pool_coordinates(index)
        if data is not None:
            ranking = index.rank(data.texts, data.labels, data.task, top=top, shortlist=max(DEFAULT_SHORTLIST, top))
            ranking.target["file"] = str(target_file)
    for line in ranking.warnings if ranking else []:
        click.echo(f"warning: {line}", err=True)
    path = draw(pool, out, color_by, ranking)
    click.echo(f"wrote {path}: {plural(len(pool.ids), 'source')}"
               + (f", the top {len(ranking.results)} for {target_file} marked" if ranking else ""))


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@friendly
def verify(folder):
    """Check LMDB and FAISS agree and every weight is finite; exit 0 only when clean."""
    with _open(folder, readonly=True) as index:
        problems = index.verify()
        count = len(index)
    if problems:
        for p in problems:
            click.echo(f"problem: {p}", err=True)
        sys.exit(1)
    click.echo(f"ok: {plural(count, 'source')}, LMDB and FAISS agree")


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--reprobe", is_flag=True, help="Also refit the probe to the current pool and recompute summaries.")
@click.option("--probe-dim", type=int, default=None,
              help="With --reprobe: the probe's new number of directions (default: keep it), at most twice "
                   "the reference directions the index holds; a summary is k(k+1)/2 floats. 192 was no better "
                   "than 128 on the 10k bench pool (BENCHMARKS.md section 6).")
@friendly
def rebuild(folder, reprobe, probe_dim):
    """Rebuild the FAISS prefilter from LMDB."""
    with _open(folder) as index:
        index.rebuild(reprobe=reprobe, probe_dim=probe_dim)
        click.echo(f"rebuilt the prefilter over {plural(len(index), 'source')}")


if __name__ == "__main__":
    main()
