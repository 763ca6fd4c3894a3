"""A picture of a pool: each source placed by its map, coloured by language or task type,
and, for a target, its top-k ringed and numbered beside a bar chart of their scores.

People would rather look at a pool of thousands of sources than read it. The placement reuses
what the prefilter already holds: FAISS keeps each source's summary (its ESM's metric on the
probe, summary.py) as PCA coordinates whose first two are the summaries' two principal
directions, so sources whose maps act alike on targets land close together, and a map of a
million sources costs one pass over the FAISS lists, not one over the ESMs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .domain import DOMAIN_KEY
from .errors import InvalidArgumentError

COLOR_FIELDS = ("language", "task_type")
MAX_LEGEND = 12  # more groups than this share one "other" colour


@dataclass
class PoolMap:
    """Sources (id, name, metadata) and their 2-D places (n, 2)."""

    ids: np.ndarray
    names: list[str]
    metas: list[dict]
    xy: np.ndarray


def pool_coordinates(index) -> PoolMap:
    """The first two PCA coordinates of every source's summary, from the prefilter."""
    if len(index) < 3:
        raise InvalidArgumentError(f"the index holds {len(index)} sources; a map needs at least 3")
    parts = list(index.prefilter().cells())
    ids = np.concatenate([p[0] for p in parts])
    codes = np.concatenate([p[1] for p in parts])
    xy = np.zeros((len(ids), 2), np.float32)
    xy[:, :min(2, codes.shape[1])] = codes[:, :2]
    order = np.argsort(ids)
    ids, xy = ids[order], _spread(xy[order])
    metas = [{k: v for k, v in m.items() if k != DOMAIN_KEY}  # not the domain vector: 12 kB a source parsed
             for start in range(0, len(ids), 4096) for m in index.store.metas(ids[start:start + 4096])]
    return PoolMap(ids, [m["name"] for m in metas], metas, xy)


def _spread(xy: np.ndarray) -> np.ndarray:
    """Distances from the median place compressed by arcsinh, in units of their median,
    directions kept: a few far-out maps no longer squeeze the crowd into one dot, and the
    same scale on both axes keeps the picture's geometry (who is nearer whom)."""
    centred = xy - np.median(xy, 0)
    radius = np.linalg.norm(centred, axis=1)
    unit = np.median(radius) or radius.max() or 1.0
    shrink = np.where(radius > 0, np.arcsinh(radius / unit) / np.where(radius > 0, radius, 1.0), 0.0)
    return (centred * shrink[:, None]).astype(np.float32)


def draw(pool: PoolMap, out: str | os.PathLike, color_by: str = "language", ranking=None,
         title: str = "") -> Path:
    """Write the picture (PNG, or any format matplotlib knows by ``out``'s suffix). With a
    ``Ranking``, its results are ringed and numbered on the map and drawn as a bar chart."""
    if color_by not in COLOR_FIELDS:
        raise InvalidArgumentError(f"color_by must be one of {COLOR_FIELDS}, not {color_by!r}")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidArgumentError("the map needs matplotlib: pip install 'esm-index[map]'") from None
    out = Path(out)
    panels = 2 if ranking is not None and ranking.results else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels + 1, 6.5), squeeze=False)
    _scatter(axes[0, 0], pool, color_by, ranking)
    if panels == 2:
        _bars(axes[0, 1], ranking)
    fig.suptitle(title or f"{len(pool.ids)} sources, placed by their maps (summary PCA 1-2; distances "
                          f"from the centre arcsinh-compressed)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _groups(pool: PoolMap, color_by: str) -> list[str]:
    values = [str(m.get(color_by) or "unknown") for m in pool.metas]
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    kept = set(sorted(counts, key=lambda v: (-counts[v], v))[:MAX_LEGEND])
    return [v if v in kept else "other" for v in values]


def _scatter(ax, pool: PoolMap, color_by: str, ranking) -> None:
    import matplotlib.pyplot as plt

    groups = _groups(pool, color_by)
    palette = plt.get_cmap("tab20")
    size = max(4.0, 60.0 / np.sqrt(max(len(pool.ids) / 50, 1)))  # thousands of points stay readable
    for i, group in enumerate(sorted(set(groups))):
        mask = np.asarray([g == group for g in groups])
        ax.scatter(pool.xy[mask, 0], pool.xy[mask, 1], s=size, alpha=0.75, color=palette(i % 20),
                   label=f"{group} ({mask.sum()})")
    if len(pool.ids) <= 40 and ranking is None:
        for (x, y), name in zip(pool.xy, pool.names):
            ax.annotate(name, (x, y), fontsize=6, alpha=0.8, xytext=(3, 2), textcoords="offset points")
    if ranking is not None:
        place = {name: xy for name, xy in zip(pool.names, pool.xy)}
        for r in ranking.results:
            if r.source in place:
                x, y = place[r.source]
                ax.scatter([x], [y], s=size * 6, facecolors="none", edgecolors="black", linewidths=1.2)
                ax.annotate(f"{r.rank}. {r.source}", (x, y), fontsize=7, xytext=(5, 4),
                            textcoords="offset points")
    ax.set_xlabel("summary PCA 1")
    ax.set_ylabel("summary PCA 2")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(title=color_by.replace("_", " "), fontsize=7, title_fontsize=8, loc="best", markerscale=1.5)


def _bars(ax, ranking) -> None:
    results = ranking.results
    names = [f"{r.rank}. {r.source}" for r in results][::-1]
    scores = [r.score for r in results][::-1]
    ax.barh(names, scores, color="tab:blue")
    low, high = min(scores), max(scores)
    pad = (high - low) * 0.1 or abs(high) * 0.01 or 0.01
    ax.set_xlim(low - pad, high + pad)  # only differences between scores of one target mean anything
    ax.set_xlabel("ESM-LogME score (per example; higher is better)")
    target = ranking.target or {}
    ax.set_title(f"top {len(results)} for {Path(str(target.get('file', 'the target'))).name} "
                 f"({target.get('examples', '?')} examples)", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
