"""What the command line shows people: tables with headers, sizes in MB, progress lines on
stderr, click's own usage errors as the tool's one ``error:`` line, and the options shared
between commands: ``--json`` / ``--csv`` for those that print data (as sqlite-utils shares
its output options), ``--device`` / ``--batch-size`` for those that run the base model.

Kept apart from cli.py so that the commands stay a thin shell over ``SourceIndex``, and
free of heavy imports (click only), so that ``--help`` stays instant.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from functools import wraps

import click

from .errors import plural
from .results import DEFAULT_METHOD, METHODS


def fail(message: str) -> None:
    """The tool's one ``error:`` line, and exit code 2."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


class Group(click.Group):
    """click's usage errors (a missing option, a bad choice) as the same one line our own
    errors use, ``error: ...`` with exit code 2, instead of a usage block ending in a
    capitalised ``Error:`` next to our ``error:``."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            value = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `esm-index`: the help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            click.echo(f"error: {_lower_first(exc.format_message()).rstrip('.')}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        if standalone_mode:
            sys.exit(value if isinstance(value, int) else 0)
        return value


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


class ProgressLines(logging.Handler):
    """The library's progress messages (loading the model, embedding, fine-tuning) as lines
    on stderr, terminal or not: a pipe or a CI log should show why a command takes a minute.
    click.echo looks stderr up at each line, so CliRunner captures them too."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"esm-index: {record.getMessage()}", err=True)


def show_progress() -> None:
    """Route the ``esm_index`` loggers' INFO lines to stderr (once per process)."""
    logger = logging.getLogger("esm_index")
    if not any(isinstance(h, ProgressLines) for h in logger.handlers):
        logger.addHandler(ProgressLines())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def info_lines(data: dict, folder: str) -> list[str]:
    """``esm-index info`` for people: one labelled line per fact (``--json`` has the raw dict)."""
    emb = data["embedding"]
    return [
        f"index       {folder}",
        f"sources     {data['sources']}",
        f"base model  {data['model']} ({data['dim']}-d, {emb['pooling']} pooling, "
        f"{'L2-normalised' if emb['normalize'] else 'not normalised'}, {emb['max_length']} tokens)",
        f"ESMs        {data['esm_dtype']}",
        f"prefilter   {data['prefilter']}, {data['summary_dim']} floats per summary",
        f"on disk     LMDB {megabytes(data['lmdb_bytes'])}, FAISS {megabytes(data['faiss_bytes'])}",
        f"schema      version {data['schema_version']}, generation {data['generation']}",
        f"recipe      {data.get('recipe') or 'not recorded, or mixed (sources made by different recipes)'}",
    ]


def source_table(sources: list[dict]) -> list[str]:
    """``esm-index list`` for people: aligned columns under a header, and a count."""
    header = ("name", "task", "language", "examples", "title")
    rows = [(s["name"], s.get("task_type") or "", s.get("language") or "", str(s.get("num_examples") or ""),
             s.get("title") or "") for s in sources]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in [header, *rows]]
    return [line.rstrip() for line in lines] + [plural(len(rows), "source")]


METHOD_NAMES = {"combined": "ESM-LogME + domain similarity", "esm-logme": "ESM-LogME",
                "domain": "domain similarity"}


RANKING_COLUMNS = ("rank", "source", "score", "esm_logme", "domain_similarity", "faiss_score", "approximate_score",
                   "refining_score", "language", "num_examples")
SOURCE_COLUMNS = ("name", "task_type", "language", "num_examples", "title")


def ranking_table(results: list) -> list[str]:
    """``esm-index rank`` for people: the ranking score, then its two parts (ESM-LogME, and
    the cosine of the target's and the source's mean embeddings; "-" where a source has no
    domain vector), then the source with its title and language."""
    lines = [f"{'rank':>4}  {'score':>7}  {'ESM-LogME':>9}  {'domain':>6}  source"]
    for r in results:
        extra = ", ".join(str(v) for v in (r.meta.get("title"), r.meta.get("language")) if v)
        dom = r.domain_similarity
        score = "-" if r.score is None else f"{r.score:.3f}"  # None: no domain vector, by "domain"
        lines.append(f"{r.rank:>4}  {score:>7}  {r.esm_logme:>9.4f}  {'-' if dom is None else f'{dom:.3f}':>6}  "
                     f"{r.source}" + (f"  ({extra})" if extra else ""))
    return lines


def ranking_rows(results: list) -> list[list]:
    """``RANKING_COLUMNS`` of each result, scores to six decimals (the digits beyond are
    rounding noise), empty where there is none."""
    six = lambda v: "" if v is None else f"{v:.6f}"  # noqa: E731
    return [[r.rank, r.source, six(r.score), six(r.esm_logme), six(r.domain_similarity), six(r.faiss_score),
             six(r.approximate_score), six(r.refining_score), r.meta.get("language", ""),
             r.meta.get("num_examples", "")] for r in results]


def target_kind(target: dict) -> str:
    """'classification, 2 classes' or 'regression, 1 label column', for the header line."""
    if target.get("task") == "regression":
        return f"regression, {plural(target.get('label_columns', 1), 'label column')}"
    return f"classification, {plural(target.get('classes', 0), 'class', 'classes')}"


def model_options(fn):
    """--device and --batch-size, for the commands that run the base model."""
    fn = click.option("--batch-size", type=int, default=64, show_default=True,
                      help="Texts per forward pass of the base model (lower it when memory is short).")(fn)
    return click.option("--device", default=None,
                        help="Where the base model and scorer run: cpu, cuda, cuda:1 (default: cuda if available).")(fn)


def output_options(fn):
    """--json and --csv, for every command that prints data; the command gets ``fmt``:
    "table" (for people), "json" or "csv"."""
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.option("--csv", "as_csv", is_flag=True, help="Print CSV.")
    @wraps(fn)
    def wrapper(*args, as_json: bool, as_csv: bool, **kwargs):
        if as_json and as_csv:
            fail("--json and --csv exclude each other: pick one output format")
        return fn(*args, fmt="json" if as_json else "csv" if as_csv else "table", **kwargs)
    return wrapper


def output(fmt: str, data, columns, rows, lines: list[str]) -> None:
    """Print ``data`` as JSON, ``rows`` under ``columns`` as CSV, or ``lines`` for people."""
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        click.echo("\n".join(lines))


def query_options(fn):
    """The stages' sizes, --exact, --method and the metadata filters (``results.Query``)."""
    options = [
        click.option("--shortlist", type=int, default=None,
                     help="Sources scored exactly after the prefilter (default 32)."),
        click.option("--candidates", type=int, default=None,
                     help="Sources the FAISS stage passes on (default by pool size: 512, or 768 above 20k sources)."),
        click.option("--refine", type=int, default=None,
                     help="Sources the refining stage scores from full maps "
                          "(default by pool size: 128, or 384 above 20k sources)."),
        click.option("--exact", is_flag=True, help="Score every source exactly (no prefilter)."),
        click.option("--method", type=click.Choice(METHODS), default=DEFAULT_METHOD, show_default=True,
                     help="Order by ESM-LogME and domain similarity together, by ESM-LogME alone (the paper), "
                          "or by domain similarity alone."),
        click.option("--task-type", "f_task", default=None, help="Only sources of this task type."),
        click.option("--language", "f_language", default=None, help="Only sources in this language."),
        click.option("--tag", "f_tags", multiple=True, help="Only sources with this tag (repeatable)."),
        click.option("--min-size", type=int, default=None, help="Only sources with at least this many examples."),
    ]
    for option in reversed(options):  # as decorators written above the function, first on top
        fn = option(fn)
    return fn
