"""Score goemo's exported model on the test split with Python transformers + scikit-learn, with
its own thresholds.json, and compare the macro-F1 with goemo evaluate's metrics.json. Run by
hand (needs torch, transformers, scikit-learn):

    python scripts/check_quality.py outputs/model outputs/metrics.json [data/goemotions]

Prints macro-F1 tuned / at 0.5 / at 0.3 from both sides and exits 1 when any pair differs by
more than 0.003. Covers the 28-label taxonomy (the official splits' label ids).
"""
import json
import sys

import numpy as np
import torch
from sklearn.metrics import f1_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model_dir, metrics_path = sys.argv[1], sys.argv[2]
data_dir = sys.argv[3] if len(sys.argv) > 3 else "data/goemotions"
torch.set_num_threads(2)

names = [l.strip() for l in open(f"{data_dir}/labels.txt") if l.strip()]
texts, gold = [], []
for line in open(f"{data_dir}/test.tsv", encoding="utf-8"):
    text, ids, _ = line.rstrip("\n").split("\t")
    texts.append(text)
    gold.append([int(i) for i in ids.split(",")])

remote = json.load(open(f"{model_dir}/config.json")).get("auto_map") is not None
tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=remote).eval()
labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
assert sorted(labels) == sorted(names), "the model's labels are not the 28 of labels.txt"
y = np.zeros((len(texts), len(labels)), dtype=np.int64)
col = {name: j for j, name in enumerate(labels)}
for r, ids in enumerate(gold):
    for i in ids:
        y[r, col[names[i]]] = 1

# Length-sorted batches (as a deployment would), probabilities put back in row order.
order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
probs = np.zeros((len(texts), len(labels)), dtype=np.float32)
with torch.inference_mode():
    for s in range(0, len(order), 64):
        idx = order[s:s + 64]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=512,
                  return_tensors="pt")
        probs[idx] = torch.sigmoid(model(**enc).logits).numpy()

th = json.load(open(f"{model_dir}/thresholds.json"))
tuned = np.array([th["thresholds"][th["labels"].index(name)] for name in labels], dtype=np.float32)
ours = {
    "tuned": f1_score(y, probs >= tuned, average="macro", zero_division=0),
    "0.5": f1_score(y, probs >= 0.5, average="macro", zero_division=0),
    "0.3": f1_score(y, probs >= 0.3, average="macro", zero_division=0),
}
m = json.load(open(metrics_path))["policies"]
theirs = {"tuned": m["tuned"]["macro"]["f1"], "0.5": m["0.5"]["macro"]["f1"], "0.3": m["0.3"]["macro"]["f1"]}
worst = 0.0
for k in ours:
    d = abs(ours[k] - theirs[k])
    worst = max(worst, d)
    print(f"test macro-F1 {k:>5}: transformers+sklearn {ours[k]:.4f}  goemo evaluate {theirs[k]:.4f}  |diff| {d:.4f}")
print(f"{len(texts)} test rows; largest difference {worst:.4f} (allowed 0.003)")
sys.exit(0 if worst <= 0.003 else 1)
