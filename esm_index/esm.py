"""Embedding Space Maps: the linear map (W, b), its files, and how to fit one.

An ESM turns base-model embeddings x (d) into an imitation of a fine-tuned model's
embeddings W x + b (D). On disk we use hfselect's own layout, so our ESMs are theirs:
``model.safetensors`` holding ``model.weight`` [D, d] and ``model.bias`` [D], plus a JSON
``config.json`` of metadata. hfselect 0.1.0 folders (``sequential.0.*``, perhaps no
``esm_embedding_dim``) load too. Pickles (``pytorch_model.bin``) are refused, never opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InvalidESMError, ModelMismatchError, UnsafeFileError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PICKLE_FILES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.pkl")
TENSOR_NAMES = (("model.weight", "model.bias"), ("sequential.0.weight", "sequential.0.bias"))
HFSELECT_VERSION = "0.2.1"  # the format version we write, as hfselect would


@dataclass
class ESM:
    """A linear embedding space map. ``meta`` is free-form JSON (task, provenance, fit)."""

    weight: np.ndarray  # (D, d)
    bias: np.ndarray  # (D,)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, dtype=np.float32)
        self.bias = np.asarray(self.bias, dtype=np.float32)
        self.validate()

    @property
    def in_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def out_dim(self) -> int:
        return self.weight.shape[0]

    def validate(self, dim: int | None = None) -> None:
        """Raise InvalidESMError unless the map is usable (and takes ``dim`` inputs)."""
        if self.weight.ndim != 2 or self.bias.ndim != 1 or self.bias.shape[0] != self.weight.shape[0]:
            raise InvalidESMError(f"ESM weight must be (D, d) and bias (D,); got "
                                  f"{self.weight.shape} and {self.bias.shape}")
        if min(self.weight.shape) == 0:
            raise InvalidESMError("ESM weight is empty")
        if not (np.isfinite(self.weight).all() and np.isfinite(self.bias).all()):
            raise InvalidESMError("ESM weights contain NaN or infinity")
        if dim is not None and self.in_dim != dim:
            raise ModelMismatchError(f"ESM takes {self.in_dim}-dimensional embeddings, the model gives {dim}")

    def apply(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias

    # ---- files -------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write hfselect's current format; hfselect's ``ESM.from_pretrained`` reads it."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"model.weight": np.ascontiguousarray(self.weight),
                   "model.bias": np.ascontiguousarray(self.bias)}, str(folder / WEIGHTS_FILE))
        config = {"esm_architecture": "linear", "version": HFSELECT_VERSION, **self.meta,
                  "esm_embedding_dim": self.in_dim}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
        # safetensors writes its file 0600; give it the mode the umask gives config.json
        os.chmod(folder / WEIGHTS_FILE, (folder / CONFIG_FILE).stat().st_mode & 0o777)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ESM":
        """Read an ESM folder (ours or hfselect's, 0.1.0 or later). Never unpickles."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not folder.is_dir():
            raise InvalidESMError(f"{folder}: not an ESM folder")
        weights_path = folder / WEIGHTS_FILE
        if not weights_path.is_file():
            pickles = [p for p in PICKLE_FILES if (folder / p).exists()]
            if pickles:
                raise UnsafeFileError(f"{folder / pickles[0]}: pickle files are never loaded; "
                                      f"convert the ESM to safetensors ({WEIGHTS_FILE})")
            raise InvalidESMError(f"{folder}: no {WEIGHTS_FILE}")
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidESMError(f"{weights_path}: unreadable safetensors file ({exc})") from None
        meta = {}
        if (folder / CONFIG_FILE).is_file():
            try:
                meta = json.loads((folder / CONFIG_FILE).read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InvalidESMError(f"{folder / CONFIG_FILE}: not valid JSON ({exc})") from None
            if not isinstance(meta, dict):
                raise InvalidESMError(f"{folder / CONFIG_FILE}: expected a JSON object")
        for w_name, b_name in TENSOR_NAMES:
            if w_name in tensors and b_name in tensors:
                esm = cls(tensors[w_name], tensors[b_name], meta)
                declared = meta.get("esm_embedding_dim")
                if declared is not None and int(declared) != esm.in_dim:
                    raise InvalidESMError(f"{folder}: config says dimension {declared}, "
                                          f"weights are {esm.weight.shape}")
                return esm
        raise InvalidESMError(f"{weights_path}: expected tensors model.weight/model.bias "
                              f"(or sequential.0.*), found {sorted(tensors)}")


# ---- fitting ---------------------------------------------------------------------------
RIDGE_GRID = tuple(10.0 ** k for k in range(-5, 5))


def _mse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean((pred - target) ** 2))


def fit_ridge(base: np.ndarray, tuned: np.ndarray, ridge_grid: tuple[float, ...] = RIDGE_GRID,
              holdout: float = 0.2, seed: int = 0) -> ESM:
    """Closed-form ridge least squares tuned ~ W base + b: the exact optimum of the paper's
    MSE objective, plus a ridge chosen on held-out pairs.

    When base and tuned have the same dimension, the ridge pulls W towards the identity
    (we regress tuned - base on base): fine-tuning moves embeddings only a little, so with
    few fitting pairs the map falls back to "no change" instead of towards zero. The ridge
    strength (scaled by the mean eigenvalue of the centred Gram) is chosen by held-out MSE,
    then the map is refitted on all pairs. The held-out error of the chosen map and of the
    identity map are kept in ``meta['fit']``: the ESM is only worth its disk if the first is
    well below the second.
    """
    base, tuned = np.asarray(base, np.float64), np.asarray(tuned, np.float64)
    if base.ndim != 2 or tuned.ndim != 2 or tuned.shape[0] != base.shape[0] or base.shape[0] < 4:
        raise InvalidESMError(f"need paired embeddings (n, d) and (n, D), n >= 4; got {base.shape}, {tuned.shape}")
    square = base.shape[1] == tuned.shape[1]
    prior = np.eye(base.shape[1]) if square else np.zeros((tuned.shape[1], base.shape[1]))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(base))
    n_val = max(1, int(len(base) * holdout))
    val, train = perm[:n_val], perm[n_val:]

    def solve(x: np.ndarray, y: np.ndarray, lams: tuple[float, ...]):
        """Yield (lam, W, b) minimising |y - x W^T - b|^2 + lam*scale*|W - prior|^2."""
        mx, my = x.mean(0), y.mean(0)
        xc, yc = x - mx, (y - my) - (x - mx) @ prior.T
        evals, evecs = np.linalg.eigh(xc.T @ xc)
        proj = evecs.T @ (xc.T @ yc)
        scale = max(float(evals.mean()), 1e-12)
        for lam in lams:
            w = prior + (evecs @ (proj / (evals + lam * scale)[:, None])).T  # (D, d)
            yield lam, w, my - w @ mx

    scores = {lam: _mse(base[val] @ w.T + b, tuned[val]) for lam, w, b in solve(base[train], tuned[train], ridge_grid)}
    best = min(scores, key=scores.get)
    _, w, b = next(solve(base, tuned, (best,)))
    fit = {"method": "ridge", "ridge": best, "pairs": len(base), "heldout_pairs": int(n_val),
           "heldout_mse": scores[best], "identity_mse": _mse(base[val], tuned[val]) if square else None}
    return ESM(w, b, {"fit": fit})


def fit_sgd(base: np.ndarray, tuned: np.ndarray, epochs: int = 10, lr: float = 1e-3,
            batch_size: int = 32, seed: int = 0, device: str = "cpu") -> ESM:
    """The paper's recipe: a linear layer trained with MSE and AdamW (lr 1e-3, 10 epochs,
    batch 32). Slower and less exact than ``fit_ridge``; kept for faithfulness."""
    import torch

    torch.manual_seed(seed)
    x = torch.as_tensor(np.asarray(base, np.float32), device=device)
    y = torch.as_tensor(np.asarray(tuned, np.float32), device=device)
    layer = torch.nn.Linear(x.shape[1], y.shape[1]).to(device)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), device=device).split(batch_size):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(layer(x[idx]), y[idx])
            loss.backward()
            opt.step()
    w = layer.weight.detach().cpu().numpy()
    b = layer.bias.detach().cpu().numpy()
    fit = {"method": "sgd", "epochs": epochs, "lr": lr, "batch_size": batch_size, "pairs": len(x),
           "train_mse": _mse(np.asarray(base) @ w.T + b, np.asarray(tuned))}
    return ESM(w, b, {"fit": fit})
