"""The peer users would pick: llama.cpp (llama-cpp-python) on the same GGUF,
same threads, prefilling the same 45-token turns incrementally on its own KV
cache. Prints JSON: per-turn median/min/max ms over turns 1..10, and one
token at a time.

    python bench/llama_peer.py GGUF TOKENIZER_JSON REPS
"""

import json
import sys
import time

from llama_cpp import Llama
from tokenizers import Tokenizer

TURNS = [line for line in open("bench/turns.txt").read().splitlines() if line.strip()]
gguf, tokenizer_json, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = Tokenizer.from_file(tokenizer_json)
llm = Llama(model_path=gguf, n_threads=2, n_threads_batch=2, n_ctx=4096, n_batch=512, verbose=False, logits_all=False)
turn_ids = [tok.encode(TURNS[i % len(TURNS)]).ids for i in range(10)]

llm.reset()
llm.eval(turn_ids[0])  # warm-up
per_turn = []
for _ in range(reps):
    llm.reset()
    for ids in turn_ids:
        t = time.perf_counter()
        llm.eval(ids)
        per_turn.append((time.perf_counter() - t) * 1e3)
one_by_one = []
for _ in range(max(1, reps // 2)):
    llm.reset()
    t = time.perf_counter()
    for i in turn_ids[0]:
        llm.eval([i])
    one_by_one.append((time.perf_counter() - t) * 1e3)


def stats(ms):
    ms = sorted(ms)
    return {"median_ms": ms[len(ms) // 2], "min_ms": ms[0], "max_ms": ms[-1], "n": len(ms)}


print(json.dumps({"turns_1_to_10": stats(per_turn), "token_by_token_45": stats(one_by_one), "turn_tokens": len(turn_ids[0])}))
