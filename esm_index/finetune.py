"""Make an ESM from real models: fine-tune the base model on a source task, then fit the map.

Three entry points, from most to least given:
  (a) ``esm.fit_ridge(base_embeddings, tuned_embeddings)`` - paired embeddings;
  (b) ``esm_from_models(embedder, tuned_encoder, texts)`` - embed texts with both models;
  (c) ``finetune_and_fit(embedder, data)`` - fine-tune on labelled data (the paper's recipe), then (b).

The map has d+1 inputs per output, so it needs many more fitting texts than d: fine-tuning
uses a capped sample (slow), while the map is fitted on up to ``fit_examples`` texts of the
task (embedding is cheap), as the paper does with its 10,000.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .data import LabelledData
from .domain import DOMAIN_KEY, domain_vector
from .embed import Embedder
from .errors import InvalidTargetError
from .esm import ESM, fit_ridge


@dataclass
class FinetuneConfig:
    """The paper's recipe by default. For a CPU, ``max_steps`` and ``max_length`` are the knobs.

    ``max_steps`` replaces "``epochs`` passes over the sample" by a fixed number of optimizer
    steps per task (sampling the examples in reshuffled passes, at most ``epochs`` of them when
    ``max_steps`` is unset). A fixed step budget moves every source's space by a comparable
    amount; a fixed number of examples barely moves small tasks and lets the many-class ones
    become "hubs" that LogME rewards for every target (BENCHMARKS.md, "same-task retrieval").
    """

    max_examples: int = 10_000  # fine-tuning sample (seeded)
    fit_examples: int = 10_000  # texts used to fit the ESM
    epochs: int = 3  # passes over the sample; with max_steps, the most passes allowed
    max_steps: int | None = None  # fixed optimizer-step budget (None: epochs x batches)
    batch_size: int = 32
    lr: float = 2e-5
    weight_decay: float = 0.01
    max_length: int | None = None  # fine-tuning truncation; None: the embedding spec's
    seed: int = 0


# Other kinds of text every map is fitted on besides its source's (esm_from_models): the
# index's reference texts plus 100 source rows of each shipped task, none a held-out row
# (tools/build_pool.py --write-fit-texts). Maps fitted on many kinds of text follow the
# fine-tuned models on unseen kinds far better (BENCHMARKS.md §4, "what a better fit buys").
FIT_TEXTS = Path(__file__).with_name("fit_texts.txt")

# The recipe the shipped pool was built with on a CPU (tools/build_pool.py): 100 AdamW steps
# of 32 examples at lr 5e-5 and 64 tokens (at most 10 passes over a small task); the ESM is
# fitted on up to 1,500 texts. Chosen by measurement against a 300-step build: both find each
# task's own source or its twin first for all 26 tasks, and on the LP-FT-corrected transfer
# ground truth following this pool's ranking gave a point more accuracy (BENCHMARKS.md §3-§5).
# Sources added to a pool should share its recipe, or their scores are not comparable.
POOL_RECIPE = FinetuneConfig(max_examples=10_000, fit_examples=1_500, epochs=10, max_steps=100,
                             lr=5e-5, max_length=64)

# What decides how far fine-tuning moves a source's space, and so what must be the same for
# the sources of one pool to score on the same footing.
MOVEMENT_FIELDS = ("epochs", "max_steps", "batch_size", "lr", "weight_decay", "max_length")


def recorded_recipe(meta: dict) -> tuple[dict, int, int] | None:
    """(the MOVEMENT_FIELDS, examples, steps taken) that a source's metadata records, or None.

    Two records exist: ``finetune_and_fit``'s (``esm-index add``: the FinetuneConfig fields,
    plus the examples and steps) and tools/build_pool.py's (the steps the task got and the
    pass cap, ``max_passes``; the steps stand in for the budget, which ``pool_recipe`` infers).
    Metadata can come from anywhere, so a record of another shape counts as none."""
    ft = meta.get("finetune") if isinstance(meta, dict) else None
    try:
        if "max_passes" in ft:
            fields = {"epochs": ft["max_passes"], "max_steps": ft["steps"],
                      **{k: ft[k] for k in ("batch_size", "lr", "weight_decay", "max_length")}}
            return fields, int(meta["num_examples"]), int(ft["steps"])
        return {k: ft[k] for k in MOVEMENT_FIELDS}, int(ft["examples"]), int(ft["steps"])
    except (TypeError, KeyError, ValueError):
        return None


def pool_recipe(metas: Iterable[dict]) -> FinetuneConfig | None:
    """The one recipe that explains every source in ``metas`` that records one, so that a
    source added later can be fine-tuned the same way; None when none records one, or no
    single recipe explains them all (a mixed pool).

    A build_pool record gives the steps a task got, which the pass cap lowers for a small task
    (30 for 78 rows at 10 passes of 32), so the budget is the largest recorded, and each
    source must then be explained by it: ``planned_steps(its examples) == its steps``. The
    sample and fit sizes do not move the space and are not recorded by build_pool: they stay
    POOL_RECIPE's."""
    records = [r for r in map(recorded_recipe, metas) if r]
    if not records:
        return None
    fixed = [{k: v for k, v in fields.items() if k != "max_steps"} for fields, _, _ in records]
    if any(f != fixed[0] for f in fixed):
        return None
    budgets = [fields["max_steps"] for fields, _, _ in records if fields["max_steps"] is not None]
    try:
        cfg = replace(POOL_RECIPE, **fixed[0], max_steps=max(budgets) if budgets else None)
        if any(planned_steps(n, cfg) != steps for _, n, steps in records):
            return None
    except (TypeError, ValueError, InvalidTargetError):
        return None
    return cfg


def same_movement(a: FinetuneConfig, b: FinetuneConfig) -> bool:
    """True when two recipes move a source's space alike (see MOVEMENT_FIELDS)."""
    return all(getattr(a, k) == getattr(b, k) for k in MOVEMENT_FIELDS)


def describe_recipe(cfg: FinetuneConfig) -> str:
    """One line for people: '100 steps of 32 (at most 10 passes), lr 5e-05, weight decay 0.01, 64 tokens'."""
    steps = (f"{cfg.max_steps} steps of {cfg.batch_size} (at most {cfg.epochs} passes)" if cfg.max_steps
             else f"{cfg.epochs} passes in batches of {cfg.batch_size}")
    tokens = f"{cfg.max_length} tokens" if cfg.max_length else "the index's token limit"
    return f"{steps}, lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, {tokens}"


def finetune(embedder: Embedder, data: LabelledData, cfg: FinetuneConfig | None = None,
             progress: bool = False):
    """Fine-tune a copy of the embedder's encoder; returns the encoder (the head is discarded:
    the ESM imitates the encoder)."""
    return finetune_with_head(embedder, data, cfg, progress)[0]


def finetune_with_head(embedder: Embedder, data: LabelledData, cfg: FinetuneConfig | None = None,
                       progress: bool = False, probe_head: bool = False):
    """Fine-tune a copy of the embedder's encoder with a linear head on its pooled embedding
    (cross-entropy for classes, MSE for regression); AdamW with a linear schedule.
    Returns (encoder, head), both in eval mode; the transfer benchmark predicts with the head.

    ``probe_head``: start the head from a linear probe of the starting encoder's features
    (``fit_probe_head``) instead of at random: LP-FT (Kumar et al., ICLR 2022). At a small
    learning rate a random head hardly moves in a few dozen steps, so a short fine-tune on a
    small target then measures how the random head happens to line up with the encoder more
    than what the encoder knows (BENCHMARKS.md §5, session 12)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    cfg = cfg or FinetuneConfig()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    idx = rng.permutation(len(data))[: cfg.max_examples]
    texts = embedder.join([data.texts[i] for i in idx])
    labels = torch.as_tensor(data.labels[idx])
    if data.regression:
        labels = labels.float().reshape(len(idx), -1)
        n_out = labels.shape[1]
    else:
        n_out = int(data.labels.max()) + 1

    device = embedder.device
    encoder = copy.deepcopy(embedder.model).to(device).train()
    head = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(embedder.dim, n_out)).to(device)
    max_length = cfg.max_length or embedder.spec.max_length
    if probe_head:  # the features the head will see: this encoder, at the fine-tuning's token limit
        start = embedder.with_model(encoder)  # a copy, in eval mode while it embeds
        start.spec = replace(embedder.spec, max_length=max_length)
        fit_probe_head(head[1], torch.from_numpy(start.embed(texts)), labels, data.regression)
        encoder.train()
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = planned_steps(len(idx), cfg)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    bar = tqdm(total=steps, desc="fine-tuning", unit="step", disable=not progress, leave=False)
    for batch in _batches(len(idx), cfg.batch_size, steps):
        enc = embedder.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                 max_length=max_length, return_tensors="pt",
                                 return_token_type_ids=False).to(device)
        pooled = embedder.pool(encoder(**enc), enc["attention_mask"])
        logits = head(pooled)
        y = labels[batch].to(device)
        loss = (torch.nn.functional.mse_loss(logits, y) if data.regression
                else torch.nn.functional.cross_entropy(logits, y))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return encoder.eval(), head.eval()


def fit_probe_head(linear, feats, labels, regression: bool, l2: float = 1e-3) -> None:
    """Set ``linear`` (d -> outputs) to the L2-regularised linear probe of ``feats``: ridge
    regression in closed form, or multinomial logistic regression by L-BFGS (a convex fit, so
    the result does not depend on where it starts). ``l2`` weighs ||W||^2 against the mean loss."""
    import torch

    x = feats.to(linear.weight.device, torch.float32)
    y = labels.to(x.device)
    n, d = x.shape
    if regression:
        xb = torch.cat([x, torch.ones(n, 1, device=x.device)], 1)
        reg = l2 * n * torch.eye(d + 1, device=x.device)
        reg[d, d] = 0  # the bias is not shrunk
        sol = torch.linalg.solve(xb.T @ xb + reg, xb.T @ y.float())
        w, b = sol[:d].T, sol[d]
    else:
        w = torch.zeros(linear.out_features, d, device=x.device, requires_grad=True)
        b = torch.zeros(linear.out_features, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        def loss():
            opt.zero_grad()
            value = torch.nn.functional.cross_entropy(x @ w.T + b, y) + l2 * (w * w).sum()
            value.backward()
            return value

        opt.step(loss)
    with torch.no_grad():
        linear.weight.copy_(w.detach())
        linear.bias.copy_(b.detach())


def planned_steps(n_examples: int, cfg: FinetuneConfig) -> int:
    """Optimizer steps for ``n_examples``: ``epochs`` passes, or ``max_steps`` capped at
    ``epochs`` passes (so a tiny task is not fitted for hundreds of epochs)."""
    if n_examples < 1:
        raise InvalidTargetError("fine-tuning needs at least one example")
    per_epoch = -(-n_examples // cfg.batch_size)
    return cfg.epochs * per_epoch if cfg.max_steps is None else max(1, min(cfg.max_steps, cfg.epochs * per_epoch))


def _batches(n: int, batch_size: int, steps: int):
    """``steps`` batches of example indices, from reshuffled passes over ``range(n)``."""
    import torch

    done = 0
    while done < steps:
        for batch in torch.randperm(n).split(batch_size):
            if done == steps:
                return
            yield batch
            done += 1


def esm_from_models(embedder: Embedder, tuned_encoder, texts: list, progress: bool = False,
                    other_texts: Sequence = (), base: np.ndarray | None = None,
                    other_base: np.ndarray | None = None) -> ESM:
    """Embed ``texts`` with the base and the fine-tuned encoder; fit the map between them.

    ``other_texts`` (other kinds of text: ``FIT_TEXTS``) are fitted on too. A
    map fitted on the source's texts alone is used on every target's texts, and off its own
    domain it can be worse than no map at all; a few thousand texts of other kinds keep it
    honest there (BENCHMARKS.md §4, fidelity). The source's domain vector (domain.py) is the
    mean base embedding of ``texts`` alone. ``base`` and ``other_base``: their base
    embeddings, when the caller has them (a pool build reuses one set for every source)."""
    other = list(other_texts)
    base = embedder.embed(texts, progress=progress) if base is None else np.asarray(base, np.float32)
    if other:
        other_base = embedder.embed(other) if other_base is None else np.asarray(other_base, np.float32)
    base_all = np.concatenate([base, other_base]) if other else base
    tuned = embedder.with_model(tuned_encoder).embed(list(texts) + other, progress=progress)
    esm = fit_ridge(base_all, tuned)
    esm.meta[DOMAIN_KEY] = domain_vector(base)
    esm.meta["fit_texts"] = {"source": len(texts), "other": len(other)}
    return esm


def fit_sample(data: LabelledData, cfg: FinetuneConfig) -> list[str]:
    """The source's own texts its ESM is fitted on: up to ``cfg.fit_examples``, in a fixed
    order seeded apart from the fine-tuning sample's (so tools can recompute the same set)."""
    fit_idx = np.random.default_rng(cfg.seed + 1).permutation(len(data))[: cfg.fit_examples]
    return [data.texts[i] for i in fit_idx]


def finetune_and_fit(embedder: Embedder, data: LabelledData, cfg: FinetuneConfig | None = None,
                     progress: bool = False, other_texts: Sequence = (), other_base: np.ndarray | None = None):
    """Fine-tune on ``data`` and fit its ESM: (the ESM, the fine-tuned encoder). Timings and
    settings land in ``esm.meta``. ``other_base``: the base embeddings of ``other_texts``,
    when the caller has them (``SourceIndex.add`` keeps them in its embedding cache)."""
    cfg = cfg or FinetuneConfig()
    t0 = time.perf_counter()
    tuned = finetune(embedder, data, cfg, progress=progress)
    t1 = time.perf_counter()
    esm = esm_from_models(embedder, tuned, fit_sample(data, cfg), progress=progress,
                          other_texts=other_texts, other_base=other_base)
    t2 = time.perf_counter()
    esm.meta.update({
        "finetune": {**asdict(cfg), "examples": min(len(data), cfg.max_examples),
                     "steps": planned_steps(min(len(data), cfg.max_examples), cfg), "seconds": round(t1 - t0, 1)},
        "fit_seconds": round(t2 - t1, 1), "task_type": data.task,
        "base_model_name": embedder.spec.model_name, "embedding": embedder.spec.to_dict(),
    })
    return esm, tuned
