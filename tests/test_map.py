"""`esm-index map` (issue 8, item 17): a picture of the pool from the prefilter's PCA
coordinates, and of a target's top sources with their scores. Real tiny BERT, LMDB, FAISS
and matplotlib."""

import numpy as np
import pytest

from conftest import SAMPLES, one_line_error, random_esms
from esm_index.cli import main
from esm_index.index import SourceIndex

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


def _width(path) -> int:
    import matplotlib.image

    return matplotlib.image.imread(str(path)).shape[1]


def test_map_of_a_pool_and_of_a_target(runner, index_dir, esm_dirs, tmp_path):
    assert runner.invoke(main, ["import", str(index_dir), *esm_dirs]).exit_code == 0
    pool_png, target_png = tmp_path / "pool.png", tmp_path / "target.png"
    result = runner.invoke(main, ["map", str(index_dir), "--out", str(pool_png)])
    assert result.exit_code == 0 and "12 sources" in result.output, result.output
    assert pool_png.read_bytes()[:8] == PNG
    result = runner.invoke(main, ["map", str(index_dir), str(SAMPLES / "sms_spam.csv"), "--out", str(target_png),
                                  "--top", "3", "--color-by", "task_type"])
    assert result.exit_code == 0 and "the top 3" in result.output, result.output
    assert target_png.read_bytes()[:8] == PNG and _width(target_png) > _width(pool_png)  # the bar chart beside


def test_sources_with_alike_maps_land_together(tmp_path, tiny_model):
    """Two families of maps (near the identity; near a strong stretch of half the space):
    on the map, the families sit apart, farther than their members from each other."""
    from esm_index.esm import ESM
    from esm_index.pool_map import pool_coordinates

    rng = np.random.default_rng(4)
    stretch = np.diag(np.r_[np.full(16, 3.0), np.ones(16)])
    with SourceIndex.create(tmp_path / "idx", tiny_model) as index:
        near = random_esms(rng, 10, 32, scale=0.05)
        far = [ESM(stretch @ e.weight, e.bias) for e in random_esms(rng, 10, 32, scale=0.05)]
        index.add_esms([(f"near{i}", e) for i, e in enumerate(near)] + [(f"far{i}", e) for i, e in enumerate(far)])
        index.rebuild()
        pool = pool_coordinates(index)
    family = np.asarray([n.startswith("far") for n in pool.names])
    a, b = pool.xy[~family], pool.xy[family]
    between = np.linalg.norm(a.mean(0) - b.mean(0))
    within = max(np.linalg.norm(a - a.mean(0), axis=1).max(), np.linalg.norm(b - b.mean(0), axis=1).max())
    assert between > within


def test_a_map_needs_a_few_sources(runner, index_dir, tmp_path):
    assert "at least 3" in one_line_error(runner.invoke(main, ["map", str(index_dir), "--out", str(tmp_path / "m.png")]))
