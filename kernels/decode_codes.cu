// Decode attention over uniform 2-bit aquakv codes (grid u1n4, the speed preset), hand-written for the tensor cores'
// mma.sync: the codes loop of kernels/attention.py's _fused_attention_kernel for decode launches (one query token per
// request, RING_FIRST), writing the same split-K partials (running max m, denominator l, Hadamard-domain value sums in
// value-lane order) so that attention.py's _combine_kernel merges them.  Compiled at run time by NVRTC
// (kernels/cuda_decode.py), one module per configuration given by the #defines it prepends:
//   G (query heads per KV head, <= 8), NUM_Q_HEADS, PAGE_BLOCK (a multiple of 16), SINKS, WINDOW, HAS_WINDOW,
//   HAS_K_BIAS, HAS_K_SCALE, Q_BF16, V_CODE_OFFSET, K_SCALE_OFFSET (V's fp16 scale follows it),
//   STRIDE_TOKEN (bytes from one token's slot to the next), SUB_STEPS (16-token steps per loop iteration and warp: the
//   slots loaded ahead of the math), STAGES (0: loads straight into registers; N > 1: each step's slots staged in
//   shared memory by 16-byte cp.async, N - 1 steps ahead).
//   FUSED (1: the whole decode attention in this one launch: with the window a block of its own (with one segment,
//   the segment's block first) reads the 16-bit sinks / recent window into partial number num_segments; the last
//   block of a (request, KV head) to finish merges the partials and writes the output, as _combine_kernel does (with
//   one segment, that block at once, no counter); 0: the codes segments' partials only),
//   HAS_V_BIAS, OUT_KIND (0 float32, 1 bfloat16, 2 float16), RING_BF16 (the ring's and the step's 16-bit K / V).
// head_dim is 128: 32 code bytes per stream per (token, KV head); code i of byte b is head position 4 b + i, whose
// value-lane-order index is 32 i + b.
//
// One block of 4 warps = (request, KV head, split-K segment).  Each warp walks 16-token steps of the segment (warp w
// takes steps w, w + 4, ...) with its own online softmax, and the 4 warps merge in shared memory at the end.  Per step:
//   scores  S [16 tokens x 8 heads] = K codes [16 tokens x 16 dims] . Q [16 dims x 8 heads], 8 mma over 128 dims;
//   values  O^T [16 dims x 8 heads] += V codes^T [16 dims x 16 tokens] . P^T [16 tokens x 8 heads], 8 mma.
// A code c in lane i of a byte, masked in place (c 4^i in bits 2i..2i+1), is the float16 subnormal c 4^i 2^-24, which
// the tensor cores multiply exactly: one LOP3 per pair of values; the query's lane i is scaled by 4^-i and the sums are
// turned back into grid units (g0 + step c) after the loop, as attention.py's _uniform_lane / _uniform_terms do.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define FULL_MASK 0xffffffffu
#define HEAD_DIM 128
#define CODE_BYTES 32
#define NEG_INF __int_as_float(0xff800000)
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 4  // blocks per SM the register allocation must allow
#endif

__device__ __forceinline__ float half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u32 pack_half2(float lo, float hi) {  // round to nearest; lo in the low 16 bits
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float query_value(const u16* q, long long i) {
#if Q_BF16
    return __uint_as_float(((u32)q[i]) << 16);
#else
    return half_to_float(q[i]);
#endif
}

__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ u32 load_word(const u8* p) {  // read-only 32-bit load (4-byte aligned)
    u32 r;
    asm volatile("ld.global.nc.b32 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}

// c[0..3] += A [16 x 16] . B [16 x 8]: fp16 operands, fp32 accumulators (PTX m16n8k16 fragment layouts)
__device__ __forceinline__ void mma_16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float warp_max_over_groups(float x) {  // max over the 8 lane groups (same lane % 4)
    x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, 4));
    x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, 8));
    return fmaxf(x, __shfl_xor_sync(FULL_MASK, x, 16));
}

__device__ __forceinline__ float warp_sum_over_groups(float x) {
    x += __shfl_xor_sync(FULL_MASK, x, 4);
    x += __shfl_xor_sync(FULL_MASK, x, 8);
    return x + __shfl_xor_sync(FULL_MASK, x, 16);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_MASK, x, o);
    return x;
}

// key half2 number h (0..15) of a thread's 8 code bytes (words w0, w1): word h / 8, bytes (0, 2) or (1, 3) of it
// (h / 4 % 2), code lane h % 4 in place.  Its low half is byte 4 (h / 8) + h / 4 % 2 of the thread's 8, the high half
// two bytes further.
__device__ __forceinline__ u32 key_pair(u32 w0, u32 w0_hi, u32 w1, u32 w1_hi, int h) {
    u32 w = (h >> 3) ? (((h >> 2) & 1) ? w1_hi : w1) : (((h >> 2) & 1) ? w0_hi : w0);
    return w & (0x00030003u << (2 * (h & 3)));
}

struct StepLoads {
    u32 k[4];  // key code words: token g bytes 8t..8t+3, 8t+4..8t+7, then token g + 8's
    u32 v[4];  // value code word g (bytes 4g..4g+3) of tokens 2t, 2t + 1, 2t + 8, 2t + 9
    u32 s[2];  // fp16 key scale (low half) and value scale (high half) of tokens g and g + 8
};

// a step's slots start at p; kp = p + g ST + 8t, vp = p + V_CODE_OFFSET + 4g + 2t ST, sp = p + g ST + K_SCALE_OFFSET
// (per-thread offsets fixed for the whole loop: every word is one of three pointers plus a constant).  Word reads
// from global memory (load_word) or from the step's shared-memory copy (shared_word).
template <u32 (*word)(const u8*)>
__device__ __forceinline__ StepLoads read_slots(const u8* p, int k_off, int v_off, int s_off) {
    StepLoads r;
    const u8* kp = p + k_off;
    r.k[0] = word(kp);
    r.k[1] = word(kp + 4);
    r.k[2] = word(kp + 8 * STRIDE_TOKEN);
    r.k[3] = word(kp + 8 * STRIDE_TOKEN + 4);
    const u8* vp = p + v_off;
    r.v[0] = word(vp);
    r.v[1] = word(vp + STRIDE_TOKEN);
    r.v[2] = word(vp + 8 * STRIDE_TOKEN);
    r.v[3] = word(vp + 9 * STRIDE_TOKEN);
    const u8* sp = p + s_off;
    r.s[0] = word(sp);
    r.s[1] = word(sp + 8 * STRIDE_TOKEN);
    return r;
}

__device__ __forceinline__ u32 shared_word(const u8* p) { return *reinterpret_cast<const u32*>(p); }

#if STAGES > 0
// shared-memory staging: each 16-token step's slots (16 STRIDE_TOKEN contiguous bytes of one page block and KV head,
// 16-byte aligned) are copied by the warp's lanes in 16-byte cp.async chunks, STAGES - 1 steps ahead of the math
__device__ __forceinline__ u32 shared_address(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void stage_step(u32 dst, const u8* src, int lane) {
#pragma unroll
    for (int c = lane; c < STRIDE_TOKEN; c += 32)  // 16 slots = STRIDE_TOKEN chunks of 16 bytes
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst + 16 * c), "l"(src + 16 * c));
}

#endif

// one warp's 16-token step at tok0 (slots loaded in x): scores, online softmax, value sums
__device__ __forceinline__ void step_math(const StepLoads& x, int tok0, int hi, int context, int seq,
                                          const int* __restrict__ bt, const long long* __restrict__ tags,
                                          const u32 (&qb)[8][2], const float (&q_sum)[2], const float (&q_bias)[2],
                                          float k_mul, int g, int t, float (&m)[2], float (&l)[2], float (&w)[2],
                                          float (&acc)[8][4]) {
    // scores: 8 mma over the 128 dims (tokens g, g + 8 x heads 2t, 2t + 1 per thread)
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const u32 k0h = x.k[0] >> 8, k1h = x.k[1] >> 8, k2h = x.k[2] >> 8, k3h = x.k[3] >> 8;
#pragma unroll
    for (int ks = 0; ks < 8; ++ks) {
        mma_16816(s, key_pair(x.k[0], k0h, x.k[1], k1h, 2 * ks), key_pair(x.k[2], k2h, x.k[3], k3h, 2 * ks),
                  key_pair(x.k[0], k0h, x.k[1], k1h, 2 * ks + 1),
                  key_pair(x.k[2], k2h, x.k[3], k3h, 2 * ks + 1), qb[ks][0], qb[ks][1]);
    }
    const int tg = tok0 + g, tg8 = tg + 8;
    const bool valid_g = tg < hi, valid_g8 = tg8 < hi;
    const float ks_g = valid_g ? half_to_float((u16)x.s[0]) : 0.0f;
    const float ks_g8 = valid_g8 ? half_to_float((u16)x.s[1]) : 0.0f;
    const float vs_g = valid_g ? half_to_float((u16)(x.s[0] >> 16)) : 0.0f;
    const float vs_g8 = valid_g8 ? half_to_float((u16)(x.s[1] >> 16)) : 0.0f;
    float sc[4];  // base-2 logits: (token g, head 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)
    sc[0] = (s[0] * k_mul + q_sum[0]) * ks_g + q_bias[0];
    sc[1] = (s[1] * k_mul + q_sum[1]) * ks_g + q_bias[1];
    sc[2] = (s[2] * k_mul + q_sum[0]) * ks_g8 + q_bias[0];
    sc[3] = (s[3] * k_mul + q_sum[1]) * ks_g8 + q_bias[1];
    bool keep_g = valid_g, keep_g8 = valid_g8;
#if HAS_WINDOW
    // sinks and recent keys whose 16-bit copy the ring holds are the ring pass's (vllm_aquakv.window)
    if (tok0 < SINKS || tok0 + 16 > context - WINDOW) {  // (a few steps: the block is read only here)
        const long long blk = bt[(unsigned)tok0 / PAGE_BLOCK];  // (tokens tok0 .. tok0 + 15 share a page block)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int tk = r ? tg8 : tg;
            if ((r ? keep_g8 : keep_g) && (tk < SINKS || context - tk < WINDOW)) {
                const int col = WINDOW > 0 ? (tk < SINKS ? tk : SINKS + tk % (WINDOW > 0 ? WINDOW : 1))
                                           : min(tk, SINKS - 1);
                const long long tag = tags[(long long)seq * (SINKS + WINDOW) + col];
                // (the query's own key, read by the codes without a window, is the ring pass's from the step input)
                if (tk >= context || tag == blk * PAGE_BLOCK + (unsigned)tk % PAGE_BLOCK) {
                    if (r) keep_g8 = false; else keep_g = false;
                }
            }
        }
    }
#endif
    if (!keep_g) sc[0] = sc[1] = NEG_INF;
    if (!keep_g8) sc[2] = sc[3] = NEG_INF;
    // online softmax per head over the warp's tokens; the sums are rescaled only when a running max grows
    const float mx0 = fmaxf(m[0], warp_max_over_groups(fmaxf(sc[0], sc[2])));
    const float mx1 = fmaxf(m[1], warp_max_over_groups(fmaxf(sc[1], sc[3])));
    if (__any_sync(FULL_MASK, mx0 > m[0] || mx1 > m[1])) {
        const float a0 = exp2_approx(m[0] - mx0), a1 = exp2_approx(m[1] - mx1);
        m[0] = mx0;
        m[1] = mx1;
        l[0] *= a0;
        l[1] *= a1;
        w[0] *= a0;
        w[1] *= a1;
#pragma unroll
        for (int mt = 0; mt < 8; ++mt) {
            acc[mt][0] *= a0;
            acc[mt][1] *= a1;
            acc[mt][2] *= a0;
            acc[mt][3] *= a1;
        }
    }
    const float p0 = exp2_approx(sc[0] - m[0]), p1 = exp2_approx(sc[1] - m[1]);
    const float p2 = exp2_approx(sc[2] - m[0]), p3 = exp2_approx(sc[3] - m[1]);
    l[0] += p0 + p2;
    l[1] += p1 + p3;
    // value weights p * scale_v in fp16, (head 2t, head 2t + 1) pairs of tokens g and g + 8
    const u32 pg = pack_half2(p0 * vs_g, p1 * vs_g), pg8 = pack_half2(p2 * vs_g8, p3 * vs_g8);
    w[0] += half_to_float((u16)pg) + half_to_float((u16)pg8);
    w[1] += half_to_float((u16)(pg >> 16)) + half_to_float((u16)(pg8 >> 16));
    // P^T fragments (tokens 2t, 2t + 1 | 2t + 8, 2t + 9 of head g) from the threads that hold them
    const int src = 8 * t + (g >> 1);
    const u32 x0 = __shfl_sync(FULL_MASK, pg, src), x1 = __shfl_sync(FULL_MASK, pg, src + 4);
    const u32 x2 = __shfl_sync(FULL_MASK, pg8, src), x3 = __shfl_sync(FULL_MASK, pg8, src + 4);
    const u32 pick = (g & 1) ? 0x7632u : 0x5410u;
    const u32 pb0 = __byte_perm(x0, x1, pick), pb1 = __byte_perm(x2, x3, pick);
    // values: byte j of the 4 tokens' words, paired by token, code lanes in place; 8 mma over the 128 dims
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const u32 sel = j | ((4 + j) << 8);
        const u32 v01 = __byte_perm(x.v[0], x.v[1], sel), v89 = __byte_perm(x.v[2], x.v[3], sel);
#pragma unroll
        for (int ii = 0; ii < 2; ++ii) {
            const u32 mask0 = 0x00030003u << (4 * ii), mask1 = 0x000c000cu << (4 * ii);
            mma_16816(acc[2 * j + ii], v01 & mask0, v01 & mask1, v89 & mask0, v89 & mask1, pb0, pb1);
        }
    }
}

#if FUSED
__device__ __forceinline__ float sixteen_bit(u16 x) {  // the ring's and the step's 16-bit keys and values
#if RING_BF16
    return __uint_as_float(((u32)x) << 16);
#else
    return half_to_float(x);
#endif
}

// q_sh[hd] . the 16-bit key row k (128 values) for the G heads, added to s; VEC: 16-byte loads (an aligned ring row)
template <bool VEC>
__device__ __forceinline__ void row_scores(const u16* k, const float (*q_sh)[HEAD_DIM], float* s) {
#pragma unroll 4
    for (int c = 0; c < HEAD_DIM / 8; ++c) {
        u32 w[4];
        if (VEC) {
            const uint4 x = *reinterpret_cast<const uint4*>(k + 8 * c);
            w[0] = x.x, w[1] = x.y, w[2] = x.z, w[3] = x.w;
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) w[i] = (u32)k[8 * c + 2 * i] | ((u32)k[8 * c + 2 * i + 1] << 16);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float x = sixteen_bit((u16)(w[i >> 1] >> (16 * (i & 1))));
#pragma unroll
            for (int hd = 0; hd < G; ++hd) s[hd] += q_sh[hd][8 * c + i] * x;
        }
    }
}

#if HAS_WINDOW
// The 16-bit sinks and recent window of one (request, KV head), _fused_attention_kernel's RING_ONLY pass, in chunks of
// RING_CHUNK ring entries: thread tid scores entries tid and tid + 128 for the G heads (one 16-byte load per 8 key
// values); then warp w sums the values of entries w, w + 4, ... (lane: 4 head dims, one 8-byte load per entry, 4
// entries in flight).  m, l (the same in every thread) and ax (head dim tid, head order) are the partial's running max,
// denominator and value sums; part_sh holds 4 x G x 128 floats (the chunk's probabilities, then the warps' sums).
#define RING_CHUNK 256
__device__ __forceinline__ void ring_partial(const u16* __restrict__ ring_k, const u16* __restrict__ ring_v,
                                             const u16* k_own, const u16* v_own, const long long* __restrict__ tags,
                                             const int* __restrict__ bt, int seq, int kv_head, int context,
                                             float logit_scale, const float (*q_sh)[HEAD_DIM], float* part_sh,
                                             const u16** v_rows, float (*red)[4][8], float* m, float* l, float* ax) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, num_kv_heads = gridDim.y;
    const int entries = SINKS + WINDOW;
    const int win_start = max(context - WINDOW + 1, SINKS);  // key position of the first window entry
    float (*p_sh)[RING_CHUNK] = reinterpret_cast<float (*)[RING_CHUNK]>(part_sh);  // [G][RING_CHUNK]
    float a[G][4];  // this warp's value sums of head dims 4 lane .. 4 lane + 3
#pragma unroll
    for (int hd = 0; hd < G; ++hd) {
        m[hd] = -1.0e30f, l[hd] = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; ++k) a[hd][k] = 0.0f;
    }
    for (int c0 = 0; c0 < entries; c0 += RING_CHUNK) {
        float s[2][G];
        bool ok[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int r = c0 + tid + HEAD_DIM * j;  // ring entry: the sinks, then the window's positions in order
            const int t = r < SINKS ? r : win_start + r - SINKS;
            const bool own = t >= context;
            ok[j] = r < entries && t <= context;
            const u16* krow = k_own;
            const u16* vrow = v_own;  // the query's own token: this step's 16-bit input
            if (ok[j] && !own) {  // an older token: its ring entry, if that was written from the slot the token is in
                const int col = WINDOW > 0 ? (t < SINKS ? t : SINKS + t % (WINDOW > 0 ? WINDOW : 1)) : min(t, SINKS - 1);
                const long long blk = bt[(unsigned)t / PAGE_BLOCK];
                ok[j] = tags[(long long)seq * entries + col] == blk * PAGE_BLOCK + (unsigned)t % PAGE_BLOCK;
                const long long row = (((long long)seq * entries + col) * num_kv_heads + kv_head) * HEAD_DIM;
                krow = ring_k + row;
                vrow = ring_v + row;
            }
            ok[j] = ok[j] && (t < SINKS || context - t < WINDOW);
#pragma unroll
            for (int hd = 0; hd < G; ++hd) s[j][hd] = 0.0f;
            if (ok[j] && own) row_scores<false>(krow, q_sh, s[j]);
            else if (ok[j]) row_scores<true>(krow, q_sh, s[j]);
            v_rows[tid + HEAD_DIM * j] = ok[j] ? vrow : nullptr;
        }
#pragma unroll
        for (int hd = 0; hd < G; ++hd) {
            s[0][hd] = ok[0] ? s[0][hd] * logit_scale : NEG_INF;
            s[1][hd] = ok[1] ? s[1][hd] * logit_scale : NEG_INF;
            const float x = warp_max(fmaxf(s[0][hd], s[1][hd]));
            if (lane == 0) red[0][warp][hd] = x;
        }
        __syncthreads();
        float alpha[G];
#pragma unroll
        for (int hd = 0; hd < G; ++hd) {
            const float mx = fmaxf(m[hd], fmaxf(fmaxf(red[0][0][hd], red[0][1][hd]), fmaxf(red[0][2][hd], red[0][3][hd])));
            alpha[hd] = exp2_approx(m[hd] - mx);
            m[hd] = mx;
            const float p0 = ok[0] ? exp2_approx(s[0][hd] - mx) : 0.0f, p1 = ok[1] ? exp2_approx(s[1][hd] - mx) : 0.0f;
            p_sh[hd][tid] = p0;
            p_sh[hd][tid + HEAD_DIM] = p1;
            const float ps = warp_sum(p0 + p1);
            if (lane == 0) red[1][warp][hd] = ps;
        }
        __syncthreads();
#pragma unroll
        for (int hd = 0; hd < G; ++hd) {
            l[hd] = l[hd] * alpha[hd] + (red[1][0][hd] + red[1][1][hd] + red[1][2][hd] + red[1][3][hd]);
#pragma unroll
            for (int k = 0; k < 4; ++k) a[hd][k] *= alpha[hd];
        }
        const int n = min(RING_CHUNK, entries - c0);
#pragma unroll 4
        for (int e = warp; e < n; e += 4) {
            const u16* vr = v_rows[e];  // (warp-uniform)
            if (vr == nullptr) continue;
            u32 w0, w1;
            if (vr == v_own) {  // (any alignment)
                w0 = (u32)vr[4 * lane] | ((u32)vr[4 * lane + 1] << 16);
                w1 = (u32)vr[4 * lane + 2] | ((u32)vr[4 * lane + 3] << 16);
            } else {
                const uint2 x = *reinterpret_cast<const uint2*>(vr + 4 * lane);
                w0 = x.x, w1 = x.y;
            }
            const float v[4] = {sixteen_bit((u16)w0), sixteen_bit((u16)(w0 >> 16)), sixteen_bit((u16)w1),
                                sixteen_bit((u16)(w1 >> 16))};
#pragma unroll
            for (int hd = 0; hd < G; ++hd) {
                const float p = p_sh[hd][e];
#pragma unroll
                for (int k = 0; k < 4; ++k) a[hd][k] += p * v[k];
            }
        }
        __syncthreads();  // before the next chunk's p_sh, v_rows and red
    }
    // the 4 warps' sums: head dim tid of each head
    float (*merge)[G][HEAD_DIM] = reinterpret_cast<float (*)[G][HEAD_DIM]>(part_sh);  // [4][G][128]
#pragma unroll
    for (int hd = 0; hd < G; ++hd) {
#pragma unroll
        for (int k = 0; k < 4; ++k) merge[warp][hd][4 * lane + k] = a[hd][k];
    }
    __syncthreads();
#pragma unroll
    for (int hd = 0; hd < G; ++hd) ax[hd] = merge[0][hd][tid] + merge[1][hd][tid] + merge[2][hd][tid] + merge[3][hd][tid];
}
#endif
// The last block of a (request, KV head) to finish: merge the partials of its parts (codes segments, then the ring's)
// and write the output as _combine_kernel does: softmax normalization, the value sums rotated back from the Hadamard
// domain (y S^T / h with S = diag(signs) H, rows of sign_v in value-lane order), the 16-bit values' sums, the value
// mean.  Thread tid writes head dim tid of the G heads.
__device__ __forceinline__ void combine_parts(const float* m_in, const float* l_in, const float* acc_v_in,
                                              const float* acc_x_in, const u16* __restrict__ sign_v,
                                              const float* __restrict__ v_bias, void* out, long long out_row,
                                              int stride_oh, int num_segments, int num_tokens, int q0, int kv_head,
                                              float (*y_sh)[HEAD_DIM], float* part_ml) {
    const int tid = threadIdx.x, parts = num_segments + HAS_WINDOW;
    const long long seg = (long long)num_tokens * NUM_Q_HEADS, row0 = (long long)q0 * NUM_Q_HEADS + kv_head * G;
    // the parts' maxima and denominators [parts x G] in shared memory, loaded in parallel (part_ml: 2 x 65 x G floats)
    float* part_m = part_ml;
    float* part_l = part_ml + parts * G;
    for (int i = tid; i < parts * G; i += blockDim.x) {
        const long long at = (i / G) * seg + row0 + i % G;
        part_m[i] = __ldcg(m_in + at);
        part_l[i] = __ldcg(l_in + at);
    }
    __syncthreads();
    float denom[G], yx[G];
#pragma unroll
    for (int hd = 0; hd < G; ++hd) {
        float mm = -1.0e30f;
        for (int s = 0; s < parts; ++s) mm = fmaxf(mm, part_m[s * G + hd]);
        float dn = 0.0f, yv = 0.0f;
        for (int s = 0; s < num_segments; ++s) {
            const float f = exp2_approx(part_m[s * G + hd] - mm);
            dn += f * part_l[s * G + hd];
            yv += f * __ldcg(acc_v_in + (s * seg + row0 + hd) * HEAD_DIM + tid);
        }
        yx[hd] = 0.0f;
#if HAS_WINDOW  // (the ring's partial has no code value sums)
        const float f = exp2_approx(part_m[num_segments * G + hd] - mm);
        dn += f * part_l[num_segments * G + hd];
        yx[hd] = f * __ldcg(acc_x_in + (num_segments * seg + row0 + hd) * HEAD_DIM + tid);
#endif
        denom[hd] = dn;
        y_sh[hd][4 * (tid & 31) + (tid >> 5)] = yv;  // value-lane index 32 i + b -> head position 4 b + i
    }
    __syncthreads();
    // y S^T = signs * (H y) with H the Sylvester Hadamard matrix (S = diag(signs) H, columns in value-lane order; the
    // signs are S's first column): a Walsh-Hadamard transform of the head-order sums, butterflies of distance 1-16 by
    // warp shuffles, 32 and 64 through shared memory (checked against y @ sign_v^T in float64 on the CPU)
    float o[G];
#pragma unroll
    for (int hd = 0; hd < G; ++hd) {
        o[hd] = y_sh[hd][tid];
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
            const float other = __shfl_xor_sync(FULL_MASK, o[hd], d);
            o[hd] = (tid & d) ? other - o[hd] : o[hd] + other;
        }
    }
#pragma unroll
    for (int d = 32; d < HEAD_DIM; d <<= 1) {
        __syncthreads();  // (every thread has read y_sh)
#pragma unroll
        for (int hd = 0; hd < G; ++hd) y_sh[hd][tid] = o[hd];
        __syncthreads();
#pragma unroll
        for (int hd = 0; hd < G; ++hd) {
            const float other = y_sh[hd][tid ^ d];
            o[hd] = (tid & d) ? other - o[hd] : o[hd] + other;
        }
    }
    const float sign = half_to_float(sign_v[tid * HEAD_DIM]);
#pragma unroll
    for (int hd = 0; hd < G; ++hd) o[hd] *= sign;
#pragma unroll
    for (int hd = 0; hd < G; ++hd) {
        const float inv = 1.0f / denom[hd];
        float y = o[hd] * inv * (1.0f / HEAD_DIM) + yx[hd] * inv;
#if HAS_V_BIAS
        y += v_bias[kv_head * HEAD_DIM + tid];
#endif
        const long long at = out_row + (long long)(kv_head * G + hd) * stride_oh + tid;
#if OUT_KIND == 0
        reinterpret_cast<float*>(out)[at] = y;
#elif OUT_KIND == 1
        const u32 b = __float_as_uint(y);  // bfloat16, round to nearest even
        reinterpret_cast<u16*>(out)[at] = (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
#else
        u16 h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(y));
        reinterpret_cast<u16*>(out)[at] = h;
#endif
    }
}
#endif

extern "C" __global__ void __launch_bounds__(128, MIN_BLOCKS) aquakv_decode_codes(
    const u16* __restrict__ q, const u16* __restrict__ sign_k, const float* __restrict__ k_bias,
    const float* __restrict__ k_dinv, const u8* __restrict__ cache, const int* __restrict__ block_table,
    const int* __restrict__ seq_lens, const int* __restrict__ q_start, const float* __restrict__ k_terms,
    const float* __restrict__ v_terms, float* __restrict__ m_out, float* __restrict__ l_out,
    float* __restrict__ acc_v_out, const long long* __restrict__ tags, int num_segments, int num_tokens,
    double logit_scale_arg, int stride_qn, int stride_qh, int stride_block, int stride_head, int stride_bt, int tile,
    // FUSED only (else unread): the ring [rows, SINKS + WINDOW, H, 128] and this step's keys / values (16 bits), the
    // ring's value sums, the rotation back, the value mean, the output [N, Hq, 128], and a zeroed int per
    // (request, KV head) that counts its finished blocks
    const u16* __restrict__ ring_k, const u16* __restrict__ ring_v, const u16* step_k, const u16* step_v,
    int stride_kn, int stride_kh, int stride_vn, int stride_vh, float* acc_x_out, const u16* __restrict__ sign_v,
    const float* __restrict__ v_bias, void* out, int stride_on, int stride_oh, int* counters) {
    __shared__ float q_rows[G][HEAD_DIM];       // queries (times 1 / D), then rotated and scaled
    __shared__ float red[3][4][8];              // per-warp reductions: [quantity][warp][head]
    __shared__ float acc_merge[4][G][HEAD_DIM];  // the warps' value sums, in value-lane order

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int seq = blockIdx.x, kv_head = blockIdx.y, segment = blockIdx.z;
    const int q0 = q_start[seq];
    if (q_start[seq + 1] - q0 <= 0) return;  // a CUDA-graph padding request: nothing to store
    const int context = seq_lens[seq] - 1;    // position of the request's one query token
#if FUSED && HAS_WINDOW
    // the 16-bit sinks and window, partial number num_segments: a block of its own (segment == num_segments) while
    // the launch has several codes segments; with one (from 33 requests), the segment's block reads them before its
    // codes (blocks of their own there placed the codes blocks unevenly over the SMs:
    // benchmarks/results/decode_attention_h100_one_launch_probe.md)
    const bool ring_only = segment == num_segments;
    if (ring_only || num_segments == 1) {
        __shared__ const u16* v_rows[RING_CHUNK];
#pragma unroll
        for (int hd = 0; hd < G; ++hd)
            q_rows[hd][tid] = query_value(q, (long long)q0 * stride_qn + (long long)(kv_head * G + hd) * stride_qh + tid);
        __syncthreads();
        float m[G], l[G], ax[G];
        ring_partial(ring_k, ring_v, step_k + (long long)q0 * stride_kn + (long long)kv_head * stride_kh,
                     step_v + (long long)q0 * stride_vn + (long long)kv_head * stride_vh, tags,
                     block_table + (long long)seq * stride_bt, seq, kv_head, context, (float)logit_scale_arg, q_rows,
                     &acc_merge[0][0][0], v_rows, red, m, l, ax);
#pragma unroll
        for (int hd = 0; hd < G; ++hd) {
            const long long idx = ((long long)num_segments * num_tokens + q0) * NUM_Q_HEADS + kv_head * G + hd;
            acc_x_out[idx * HEAD_DIM + tid] = ax[hd];
            if (tid == 0) {
                m_out[idx] = m[hd];
                l_out[idx] = l[hd];
            }
        }
        __syncthreads();  // (q_rows, acc_merge and red are the codes part's next)
    }
    if (!ring_only)
#endif
    {  // the codes segment
#if HAS_WINDOW && WINDOW > 0
    const int kv_end = context;  // the query's own key is read by the ring pass (RING_FIRST)
#else
    const int kv_end = context + 1;
#endif
    // this segment's key range, in tiles of `tile` tokens (the plan's) as _fused_attention_kernel splits it
    const int num_tiles = (kv_end + tile - 1) / tile;
    const int per_segment = (num_tiles + num_segments - 1) / num_segments;
    const int lo = min(segment * per_segment, num_tiles) * tile;
    const int hi = min(lo + per_segment * tile, kv_end);
    const int num_steps = hi > lo ? (hi - lo + 15) / 16 : 0;

    // --- the query: q A in lane order times logit_scale / h; q . b_k ---------------------------------------------
    const float logit_scale = (float)logit_scale_arg;  // (torch's NVRTC launcher passes Python floats as doubles)
    const float q_scale = logit_scale / HEAD_DIM;
#pragma unroll
    for (int hd = 0; hd < G; ++hd) {
        float x = query_value(q, (long long)q0 * stride_qn + (long long)(kv_head * G + hd) * stride_qh + tid);
        float b = 0.0f;
#if HAS_K_BIAS
        b = x * k_bias[kv_head * HEAD_DIM + tid];
#endif
#if HAS_K_SCALE
        x *= k_dinv[kv_head * HEAD_DIM + tid];
#endif
        q_rows[hd][tid] = x;
        b = warp_sum(b);
        if (lane == 0) red[1][warp][hd] = b;
    }
    __syncthreads();
    float rotated[G];
#pragma unroll
    for (int hd = 0; hd < G; ++hd) rotated[hd] = 0.0f;
#pragma unroll 8
    for (int d = 0; d < HEAD_DIM; ++d) {  // column tid of q diag(s) H (entries +-1)
        const float s = half_to_float(sign_k[d * HEAD_DIM + tid]);
#pragma unroll
        for (int hd = 0; hd < G; ++hd) rotated[hd] += q_rows[hd][d] * s;
    }
    __syncthreads();
#pragma unroll
    for (int hd = 0; hd < G; ++hd) {
        const float x = rotated[hd] * q_scale;
        q_rows[hd][tid] = x;
        const float s = warp_sum(x);
        if (lane == 0) red[0][warp][hd] = s;
    }
    __syncthreads();
    const float k_g0 = k_terms[0], k_mul = k_terms[1] * 16777216.0f;  // code c is the subnormal c 2^-24
    float q_sum[2], q_bias[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int hd = 2 * t + j;
        q_sum[j] = 0.0f;
        q_bias[j] = 0.0f;
        if (hd < G) {
            q_sum[j] = (red[0][0][hd] + red[0][1][hd] + red[0][2][hd] + red[0][3][hd]) * k_g0;
#if HAS_K_BIAS
            q_bias[j] = (red[1][0][hd] + red[1][1][hd] + red[1][2][hd] + red[1][3][hd]) * logit_scale;
#endif
        }
    }
    // B fragments of the scores' mma: head g, the dims of key half2 numbers 2 ks and 2 ks + 1 of thread t
    u32 qb[8][2];
#pragma unroll
    for (int ks = 0; ks < 8; ++ks) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int h = 2 * ks + r, i = h & 3;
            const int pos = 32 * i + 8 * t + 4 * (h >> 3) + ((h >> 2) & 1);
            const float lane_scale = i == 0 ? 1.0f : (i == 1 ? 0.25f : (i == 2 ? 0.0625f : 0.015625f));
            float lo_v = 0.0f, hi_v = 0.0f;
            if (g < G) {
                lo_v = q_rows[g][pos] * lane_scale;
                hi_v = q_rows[g][pos + 2] * lane_scale;
            }
            qb[ks][r] = pack_half2(lo_v, hi_v);
        }
    }

    // --- the codes loop ------------------------------------------------------------------------------------------
    float m[2] = {-1.0e30f, -1.0e30f}, l[2] = {0.0f, 0.0f}, w[2] = {0.0f, 0.0f};  // heads 2t, 2t + 1
    float acc[8][4];
#pragma unroll
    for (int mt = 0; mt < 8; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.0f;
    const int* bt = block_table + (long long)seq * stride_bt;
    const long long head_base = (long long)kv_head * stride_head;
    const int k_off = g * STRIDE_TOKEN + 8 * t, v_off = V_CODE_OFFSET + 4 * g + 2 * t * STRIDE_TOKEN;
    const int s_off = g * STRIDE_TOKEN + K_SCALE_OFFSET;
#if STAGES > 0
    // warp w takes the steps w, w + 4, ...: its i-th step is staged in slot i % STAGES of its shared-memory ring,
    // STAGES - 1 steps ahead of the math (one cp.async group per step; empty groups keep the count uniform)
    __shared__ __align__(16) u8 staged[4][STAGES][16 * STRIDE_TOKEN];
    const u32 ring0 = shared_address(&staged[warp][0][0]);
    const int my_steps = warp < num_steps ? (num_steps - warp + 3) / 4 : 0;
    int blk_ahead = 0;  // the block of the next step to stage
    if (my_steps > 0) blk_ahead = bt[(unsigned)(lo + 16 * warp) / PAGE_BLOCK];
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
        if (i < my_steps) {
            const int tok = lo + 16 * (warp + 4 * i);
            stage_step(ring0 + i * 16 * STRIDE_TOKEN, cache + (long long)blk_ahead * stride_block + head_base +
                                                          ((unsigned)tok % PAGE_BLOCK) * STRIDE_TOKEN, lane);
            if (i + 1 < my_steps) blk_ahead = bt[(unsigned)(tok + 64) / PAGE_BLOCK];
        }
        asm volatile("cp.async.commit_group;");
    }
    for (int i = 0; i < my_steps; ++i) {
        asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 2));  // this lane's copies of step i have landed
        __syncwarp();  // ... and every lane's; every lane has also read step i - 1's slot, which is staged next
        const int j = i + STAGES - 1;
        if (j < my_steps) {
            const int tok = lo + 16 * (warp + 4 * j);
            stage_step(ring0 + (j % STAGES) * 16 * STRIDE_TOKEN, cache + (long long)blk_ahead * stride_block +
                                                                   head_base + ((unsigned)tok % PAGE_BLOCK) * STRIDE_TOKEN,
                       lane);
            if (j + 1 < my_steps) blk_ahead = bt[(unsigned)(tok + 64) / PAGE_BLOCK];
        }
        asm volatile("cp.async.commit_group;");
        const int tok0 = lo + 16 * (warp + 4 * i);
        const StepLoads x = read_slots<shared_word>(&staged[warp][i % STAGES][0], k_off, v_off, s_off);
        step_math(x, tok0, hi, context, seq, bt, tags, qb, q_sum, q_bias, k_mul, g, t, m, l, w, acc);
    }
    asm volatile("cp.async.wait_all;");
#else
    // warp w takes iterations w, w + 4, ...; an iteration is SUB_STEPS 16-token steps.  Software pipeline: the next
    // iteration's slots, and the blocks of the one after, are loaded before this iteration's math
    const int span = 16 * SUB_STEPS;  // tokens per iteration
    const int num_iters = (num_steps + SUB_STEPS - 1) / SUB_STEPS;
    int it = warp;
    int blk_next[SUB_STEPS];
    StepLoads cur[SUB_STEPS];
    if (it < num_iters) {
#pragma unroll
        for (int u = 0; u < SUB_STEPS; ++u) {
            const int tok = lo + span * it + 16 * u;
            if (tok < hi) {
                const long long blk = bt[(unsigned)tok / PAGE_BLOCK];
                cur[u] = read_slots<load_word>(cache + blk * stride_block + head_base + ((unsigned)tok % PAGE_BLOCK) * STRIDE_TOKEN,
                                   k_off, v_off, s_off);
            }
            if (tok + 4 * span < hi) blk_next[u] = bt[(unsigned)(tok + 4 * span) / PAGE_BLOCK];
        }
    }
    for (; it < num_iters; it += 4) {
        StepLoads nxt[SUB_STEPS];
#pragma unroll
        for (int u = 0; u < SUB_STEPS; ++u) {
            const int tok1 = lo + span * (it + 4) + 16 * u;
            if (tok1 < hi) {
                nxt[u] = read_slots<load_word>(cache + (long long)blk_next[u] * stride_block + head_base +
                                       ((unsigned)tok1 % PAGE_BLOCK) * STRIDE_TOKEN, k_off, v_off, s_off);
                if (tok1 + 4 * span < hi) blk_next[u] = bt[(unsigned)(tok1 + 4 * span) / PAGE_BLOCK];
            }
        }
#pragma unroll
        for (int u = 0; u < SUB_STEPS; ++u) {
            const int tok0 = lo + span * it + 16 * u;
            if (tok0 < hi) {  // (warp-uniform)
                step_math(cur[u], tok0, hi, context, seq, bt, tags, qb, q_sum, q_bias, k_mul, g, t, m, l, w, acc);
            }
        }
#pragma unroll
        for (int u = 0; u < SUB_STEPS; ++u) cur[u] = nxt[u];
    }

#endif
    // --- merge the 4 warps and store the partials -----------------------------------------------------------------
    __syncthreads();  // every warp has read q_sum / q_bias from red before it is reused
    l[0] = warp_sum_over_groups(l[0]);
    l[1] = warp_sum_over_groups(l[1]);
    w[0] = warp_sum_over_groups(w[0]);
    w[1] = warp_sum_over_groups(w[1]);
    if (g == 0) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            red[0][warp][2 * t + j] = m[j];
            red[1][warp][2 * t + j] = l[j];
            red[2][warp][2 * t + j] = w[j];
        }
    }
    __syncthreads();
    float f[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int hd = 2 * t + j;
        const float mm = fmaxf(fmaxf(red[0][0][hd], red[0][1][hd]), fmaxf(red[0][2][hd], red[0][3][hd]));
        f[j] = exp2_approx(m[j] - mm);
    }
#pragma unroll
    for (int mt = 0; mt < 8; ++mt) {
        const int j = mt >> 1, i0 = 2 * (mt & 1);
        const int pos0 = 32 * i0 + 4 * g + j, pos1 = pos0 + 32;  // value-lane order of rows g and g + 8
        if (2 * t < G) {
            acc_merge[warp][2 * t][pos0] = acc[mt][0] * f[0];
            acc_merge[warp][2 * t][pos1] = acc[mt][2] * f[0];
        }
        if (2 * t + 1 < G) {
            acc_merge[warp][2 * t + 1][pos0] = acc[mt][1] * f[1];
            acc_merge[warp][2 * t + 1][pos1] = acc[mt][3] * f[1];
        }
    }
    __syncthreads();
    const float v_g0 = v_terms[0], v_mul = v_terms[1] * 16777216.0f;
    const int i = tid >> 5;
    const float lane_mul = v_mul * (i == 0 ? 1.0f : (i == 1 ? 0.25f : (i == 2 ? 0.0625f : 0.015625f)));
#pragma unroll
    for (int hd = 0; hd < G; ++hd) {
        const float mm = fmaxf(fmaxf(red[0][0][hd], red[0][1][hd]), fmaxf(red[0][2][hd], red[0][3][hd]));
        float ll = 0.0f, ww = 0.0f, a = 0.0f;
#pragma unroll
        for (int wi = 0; wi < 4; ++wi) {
            const float fw = exp2_approx(red[0][wi][hd] - mm);
            ll += red[1][wi][hd] * fw;
            ww += red[2][wi][hd] * fw;
            a += acc_merge[wi][hd][tid];
        }
        const long long idx = ((long long)segment * num_tokens + q0) * NUM_Q_HEADS + kv_head * G + hd;
        acc_v_out[idx * HEAD_DIM + tid] = a * lane_mul + v_g0 * ww;
        if (tid == 0) {
            m_out[idx] = mm;
            l_out[idx] = ll;
        }
    }
    }  // (the codes segment)
#if FUSED
    // --- the last block of the (request, KV head) merges the parts (its own too) and writes the output -------------
    __shared__ int last;
    __syncthreads();  // every thread's partial stores are done, as this block sees them
    if (num_segments > 1) {  // (one segment, as from 33 requests: this block is the only one, no counter)
        if (tid == 0) {  // (one thread per block, its release / acquire cumulative over the barriers)
            int* count = counters + (long long)seq * gridDim.y + kv_head;
            int done;  // the block's partial is visible (release) before it counts as done
            asm volatile("atom.release.gpu.global.add.s32 %0, [%1], 1;" : "=r"(done) : "l"(count) : "memory");
            last = done == num_segments + HAS_WINDOW - 1;  // (the codes segments' blocks and the ring's)
            if (last) {
                asm volatile("fence.acq_rel.gpu;" ::: "memory");  // ... and the other blocks' before this one reads
                *count = 0;  // zero again for the next launch (the next layer's, a CUDA-graph replay)
            }
        }
        __syncthreads();
        if (!last) return;
    }
    combine_parts(m_out, l_out, acc_v_out, acc_x_out, sign_v, v_bias, out, (long long)q0 * stride_on, stride_oh,
                  num_segments, num_tokens, q0, kv_head, q_rows, &acc_merge[0][0][0]);
#endif
}
