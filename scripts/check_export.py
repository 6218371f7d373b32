"""Load goemo's exported model in Python transformers and compare its probabilities with
`goemo predict` on 20 texts. Run by hand (needs torch and transformers):

    python scripts/check_export.py outputs/model [path/to/goemo]

Prints the largest absolute probability difference (target: <= 1e-4).
"""
import json
import subprocess
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model_dir = sys.argv[1] if len(sys.argv) > 1 else "outputs/model"
goemo = sys.argv[2] if len(sys.argv) > 2 else "target/release/goemo"
texts = [
    "Thank you so much, this made my day!", "I can't believe they did that to him.",
    "lol that's hilarious", "I'm so sorry for your loss.", "What does this even mean?",
    "This is disgusting.", "I'm really nervous about tomorrow", "Wow, I did not see that coming!",
    "I love you guys", "Ugh, not again.", "I hope it works out for you.", "That's a relief.",
    "I'm so proud of you!", "Oh, I see now.", "I regret saying that.", "Meh.",
    "[NAME] is the best player we have", "Why would anyone do that?", "I want one so badly",
    "Congratulations on the new job!",
]
# A model trained with train.pooling: mean ships its head as modeling_goemo.py (config auto_map).
remote = json.load(open(f"{model_dir}/config.json")).get("auto_map") is not None
tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=remote).eval()
assert model.config.problem_type == "multi_label_classification"
with torch.inference_mode():
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    probs = torch.sigmoid(model(**enc).logits).numpy()
labels = [model.config.id2label[i] for i in range(probs.shape[1])]
out = subprocess.run([goemo, "predict", "--model", model_dir, "--top-k", str(len(labels)), *texts],
                     check=True, capture_output=True, text=True).stdout
worst = 0.0
for i, line in enumerate(out.splitlines()):
    scores = {l["label"]: l["score"] for l in json.loads(line)["labels"]}
    for j, name in enumerate(labels):
        worst = max(worst, abs(scores[name] - float(probs[i, j])))
print(f"transformers {model.__class__.__name__} vs goemo predict on {len(texts)} texts: "
      f"max |probability difference| = {worst:.2e} ({'ok' if worst <= 1e-4 else 'ABOVE 1e-4'})")
