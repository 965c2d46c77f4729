"""Student scorers: a small multi-output MLP per group on the frozen record embedding.

A student predicts every anchor score of its group from the record's embedding (the `embeddings` table), so
full-corpus scoring costs one encoder pass per record. Trained in torch; stored and served as plain numpy
weights (a forward pass is two matrix products), inside an MLflow pyfunc model.

Aggregate quality (the rule, also in the README):
1. Reliability of dimension d is the Spearman correlation rho_d between student and teacher scores on held-out
   labels. d is masked when it has fewer than `train.min_labels` held-out labels, rho_d is undefined, or
   rho_d < `train.reliability_threshold`.
2. Weights: w_d = rho_d / sum of rho over unmasked dimensions (0 for masked ones).
3. Each predicted score is standardized with the mean and standard deviation of the student's predictions on
   the group's whole label sample: z_d = (pred_d - mu_d) / sigma_d.
4. raw = sum_d w_d * z_d; quality = (raw - mean(raw)) / std(raw), again over the label sample, so quality is in
   standard units within the group (0 = a typical record of the group) and a record's quality never depends
   on which other records are scored (incremental scoring stays exact).
5. A group whose dimensions are all masked has no quality (null): it is logged as an error and selection ranks
   its records neutrally instead of treating them as good or bad.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np


@dataclass
class StudentWeights:
    """Everything needed to score: layer weights, dimension names, and the aggregation constants."""
    group_id: int
    rubric_version: str
    dims: list[str]
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    # de-normalisation of the outputs (the net learns standardized teacher scores)
    target_mean: np.ndarray
    target_std: np.ndarray
    # aggregation
    weights: np.ndarray
    pred_mean: np.ndarray
    pred_std: np.ndarray
    raw_mean: float = 0.0
    raw_std: float = 1.0
    embedding_model: str = ""
    meta: dict = field(default_factory=dict)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted anchor scores, shape (n, n_dims), on the teacher's scale."""
        hidden = gelu(x.astype(np.float32) @ self.w1 + self.b1)
        return (hidden @ self.w2 + self.b2) * self.target_std + self.target_mean

    def quality(self, predictions: np.ndarray) -> np.ndarray:
        """Reliability-weighted, group-standardized quality; NaN when every dimension is masked."""
        if not np.any(self.weights > 0):
            return np.full(len(predictions), np.nan)
        z = (predictions - self.pred_mean) / self.pred_std
        return ((z @ self.weights) - self.raw_mean) / self.raw_std

    def to_json(self) -> str:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, np.ndarray):
                data[key] = value.tolist()
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "StudentWeights":
        data = json.loads(text)
        for key in ("w1", "b1", "w2", "b2", "target_mean", "target_std", "weights", "pred_mean", "pred_std"):
            data[key] = np.asarray(data[key], dtype=np.float32)
        return cls(**data)


def gelu(x: np.ndarray) -> np.ndarray:
    # tanh approximation, as torch.nn.GELU(approximate="tanh") computes it
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


@dataclass
class TrainResult:
    weights: StudentWeights
    train_loss: list[float]
    val_loss: list[float]
    best_epoch: int


def fit_student(x: np.ndarray, y: np.ndarray, mask: np.ndarray, hidden: int, epochs: int, lr: float,
                weight_decay: float, patience: int, seed: int, stop_fraction: float = 0.15) -> tuple:
    """Train the MLP on (x, y) where mask marks present labels. Early stopping on a seeded inner split.

    Returns (state as numpy arrays, target mean, target std, train curve, stop-set curve, best epoch).
    """
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n, n_dims = y.shape
    target_mean = np.array([y[mask[:, j], j].mean() if mask[:, j].any() else 0.0 for j in range(n_dims)],
                           dtype=np.float32)
    target_std = np.array([y[mask[:, j], j].std() if mask[:, j].sum() > 1 else 1.0 for j in range(n_dims)],
                          dtype=np.float32)
    target_std[target_std < 1e-6] = 1.0
    y_norm = np.where(mask, (y - target_mean) / target_std, 0.0).astype(np.float32)
    order = rng.permutation(n)
    n_stop = max(1, int(round(n * stop_fraction))) if n >= 8 else 0
    stop_idx, fit_idx = order[:n_stop], order[n_stop:]

    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(approximate="tanh"),
                              torch.nn.Linear(hidden, n_dims))
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    xt, yt, mt = (torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y_norm),
                  torch.from_numpy(mask.astype(np.float32)))

    def masked_mse(idx: np.ndarray) -> torch.Tensor:
        index = torch.from_numpy(idx)
        diff = (net(xt[index]) - yt[index]) * mt[index]
        return (diff ** 2).sum() / mt[index].sum().clamp(min=1.0)

    best = (math.inf, 0, None)
    train_curve, stop_curve = [], []
    for epoch in range(epochs):
        net.train()
        optimizer.zero_grad()
        loss = masked_mse(fit_idx)
        loss.backward()
        optimizer.step()
        train_curve.append(float(loss))
        if n_stop:
            net.eval()
            with torch.no_grad():
                stop_loss = float(masked_mse(stop_idx))
            stop_curve.append(stop_loss)
            if stop_loss < best[0] - 1e-6:
                best = (stop_loss, epoch, {k: v.clone() for k, v in net.state_dict().items()})
            elif epoch - best[1] >= patience:
                break
    if best[2] is not None:
        net.load_state_dict(best[2])
    state = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    return state, target_mean, target_std, train_curve, stop_curve, best[1] if best[2] is not None else epochs - 1


def student_from_state(state: dict, group_id: int, rubric_version: str, dims: list[str],
                       target_mean: np.ndarray, target_std: np.ndarray, embedding_model: str) -> StudentWeights:
    n_dims = len(dims)
    return StudentWeights(
        group_id=group_id, rubric_version=rubric_version, dims=dims,
        w1=state["0.weight"].T.astype(np.float32), b1=state["0.bias"].astype(np.float32),
        w2=state["2.weight"].T.astype(np.float32), b2=state["2.bias"].astype(np.float32),
        target_mean=target_mean, target_std=target_std,
        weights=np.zeros(n_dims, dtype=np.float32), pred_mean=np.zeros(n_dims, dtype=np.float32),
        pred_std=np.ones(n_dims, dtype=np.float32), embedding_model=embedding_model)


def set_aggregation(student: StudentWeights, reliability: dict[str, Optional[float]], masked: dict[str, bool],
                    sample_x: np.ndarray) -> None:
    """Fix the weights and standardization constants from held-out reliability and the group's label sample."""
    rho = np.array([0.0 if masked[d] or reliability[d] is None else max(reliability[d], 0.0)
                    for d in student.dims], dtype=np.float32)
    student.weights = rho / rho.sum() if rho.sum() > 0 else rho
    predictions = student.predict(sample_x)
    student.pred_mean = predictions.mean(axis=0).astype(np.float32)
    std = predictions.std(axis=0).astype(np.float32)
    std[std < 1e-6] = 1.0
    student.pred_std = std
    if rho.sum() > 0:
        raw = ((predictions - student.pred_mean) / student.pred_std) @ student.weights
        student.raw_mean = float(raw.mean())
        student.raw_std = float(raw.std()) if raw.std() > 1e-9 else 1.0


def spearman(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Spearman's rho, or None when undefined (fewer than 3 points or a constant side)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    value = spearmanr(a, b).statistic
    return None if value is None or np.isnan(value) else float(value)


def score_batches(batches, payload: dict):
    """Spark worker side (mapInPandas): decode the students once per task, score each Arrow batch by group.

    Lives here, beside the numpy model, so a worker imports numpy and pandas only (not torch or MLflow).
    """
    import pandas as pd

    students = {g: (StudentWeights.from_json(text), version) for g, (text, version) in payload.items()}
    for batch in batches:
        parts = []
        for group_id, rows in batch.groupby("group_id", sort=False):
            student, version = students[int(group_id)]
            vectors = np.stack(rows["vector"].to_numpy())
            predictions = student.predict(vectors)
            quality = student.quality(predictions)
            parts.append(pd.DataFrame({
                "record_id": rows["record_id"].to_numpy(), "source": rows["source"].to_numpy(),
                "group_id": np.int32(group_id),
                "dim_scores": [dict(zip(student.dims, map(float, p))) for p in predictions],
                "quality": [None if np.isnan(q) else float(q) for q in quality],
                "rubric_version": student.rubric_version, "student_version": version}))
        if parts:
            yield parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)


