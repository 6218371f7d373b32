"""Writes tests/fixtures/sklearn_metrics.json: a fixed multi-label prediction set and the
scikit-learn figures for it, which goemo's metrics must reproduce.

Run by hand (pip install scikit-learn numpy): python scripts/sklearn_fixture.py
"""
import json
import os

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    hamming_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

rng = np.random.default_rng(7)
n, k = 60, 5
y = (rng.random((n, k)) < [0.5, 0.3, 0.1, 0.05, 0.0]).astype(int)
y[y.sum(1) == 0, 0] = 1  # every row has a label, as in GoEmotions
scores = np.clip(0.35 * y + rng.random((n, k)) * 0.7, 0, 1).round(4)
scores[:, 3] = np.minimum(scores[:, 3], 0.2)  # a label nothing is predicted for at 0.3/0.5
thresholds = [0.5, 0.3, 0.42, 0.15, 0.9]

out = {"y_true": y.tolist(), "scores": scores.tolist(), "policies": {}}
for name, t in [("0.5", [0.5] * k), ("0.3", [0.3] * k), ("custom", thresholds)]:
    pred = (scores >= np.array(t)).astype(int)
    p, r, f, s = precision_recall_fscore_support(y, pred, zero_division=0)
    avg = {}
    for a in ["micro", "macro", "weighted", "samples"]:
        pa, ra, fa, _ = precision_recall_fscore_support(y, pred, average=a, zero_division=0)
        avg[a] = {"precision": pa, "recall": ra, "f1": fa}
    out["policies"][name] = {
        "thresholds": t,
        "precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist(), "support": s.tolist(),
        "averages": avg,
        "exact_match": float((pred == y).all(1).mean()),
        "hamming_loss": hamming_loss(y, pred),
    }
auc, ap = [], []
for j in range(k):
    if 0 < y[:, j].sum() < n:
        auc.append(roc_auc_score(y[:, j], scores[:, j]))
        ap.append(average_precision_score(y[:, j], scores[:, j]))
    else:
        auc.append(None)
        ap.append(None)
out["roc_auc"] = auc
out["average_precision"] = ap
path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "sklearn_metrics.json")
json.dump(out, open(path, "w"), indent=1)
print("wrote", path)
