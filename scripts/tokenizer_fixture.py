"""Writes tests/fixtures/tokenizer_reference.json: token ids from the Python `tokenizers`
package (the reference) for sentences that stress normalisation, with all-MiniLM-L6-v2's
tokenizer.json, padding off and truncation at 320 (goemo's tokenize default).

Run by hand (pip install tokenizers): python scripts/tokenizer_fixture.py models/all-MiniLM-L6-v2
"""
import json
import os
import sys

import tokenizers
from tokenizers import Tokenizer

model = sys.argv[1] if len(sys.argv) > 1 else "models/all-MiniLM-L6-v2"
tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
tok.no_padding()
tok.enable_truncation(320)
sentences = [
    "My favourite food is anything I didn't have to cook myself.",
    "Café naïve résumé — Ünïcödé ÀÉÎÕÜ",
    "I love this 😍😂🔥 so much!!! 👍🏽",
    "[NAME] told [RELIGION] people that [NAME] was right",
    "WHY THE FUCK IS BAYLESS ISOING",
    "   \u200b\u0000\u0007  ",
    "",
    "中文字符 and 日本語 mixed with English",
    "http://example.com/a?b=c&d=e #hashtag @user",
    " ".join(["supercalifragilisticexpialidocious"] * 200),
]
out = {
    "tokenizers_version": tokenizers.__version__,
    "max_len": 320,
    "cases": [{"text": s, "ids": tok.encode(s).ids} for s in sentences],
}
path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tokenizer_reference.json")
json.dump(out, open(path, "w", encoding="utf-8"), ensure_ascii=False, indent=1)
print("wrote", path, [len(c["ids"]) for c in out["cases"]])
