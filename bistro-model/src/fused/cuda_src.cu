// CUDA kernels of BISTRO's fused ops (compiled at run time by NVRTC, see cuda.rs).
// f32 and bf16 (as raw 16-bit words, so no CUDA headers are needed); statistics in f32.

typedef unsigned short bf16_t;
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, size_t i) { return __uint_as_float(((unsigned int)p[i]) << 16); }
__device__ __forceinline__ void st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t* p, size_t i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { p[i] = 0x7fc0; return; }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    p[i] = (bf16_t)(u >> 16);
}

// Block-wide reductions; blockDim.x is a multiple of 32, at most 1024.
__device__ float block_sum(float v) {
    __shared__ float shm[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    v = (threadIdx.x < nw) ? shm[threadIdx.x] : 0.0f;
    if (warp == 0) for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) shm[0] = v;
    __syncthreads();
    return shm[0];
}

__device__ float block_max(float v) {
    __shared__ float shm[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    v = (threadIdx.x < nw) ? shm[threadIdx.x] : NEG_INF;
    if (warp == 0) for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (threadIdx.x == 0) shm[0] = v;
    __syncthreads();
    return shm[0];
}

// ---- RMSNorm: one block per row -------------------------------------------------------
template <typename T>
__device__ void rms_fwd(const T* x, const T* w, T* y, int d, float eps) {
    size_t r = blockIdx.x;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) { float v = ld(x, r * d + j); ss += v * v; }
    float rstd = rsqrtf(block_sum(ss) / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) st(y, r * d + j, ld(x, r * d + j) * rstd * ld(w, j));
}

// dx for one row per block; also stores rstd per row for the dw pass.
template <typename T>
__device__ void rms_bwd_dx(const T* x, const T* w, const T* dy, T* out, float* rstd_out, int d, float eps) {
    size_t r = blockIdx.x;
    float ss = 0.0f, c = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = ld(x, r * d + j);
        ss += v * v;
        c += ld(dy, r * d + j) * ld(w, j) * v;
    }
    ss = block_sum(ss);
    c = block_sum(c);
    float rstd = rsqrtf(ss / d + eps);
    c = c * rstd / d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float xhat = ld(x, r * d + j) * rstd;
        st(out, r * d + j, rstd * (ld(dy, r * d + j) * ld(w, j) - xhat * c));
    }
    if (threadIdx.x == 0) rstd_out[r] = rstd;
}

// Partial dw: grid (ceil(d / blockDim.x), chunks); each thread sums one column over a row chunk.
template <typename T>
__device__ void rms_bwd_dw_partial(const T* x, const T* dy, const float* rstd, float* partial, int rows, int d, int chunk) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    int r0 = blockIdx.y * chunk, r1 = min(rows, r0 + chunk);
    float acc = 0.0f;
    for (int r = r0; r < r1; ++r) acc += ld(dy, (size_t)r * d + j) * ld(x, (size_t)r * d + j) * rstd[r];
    partial[(size_t)blockIdx.y * d + j] = acc;
}

// Sums the partials in a fixed order into row `rows` of out.
template <typename T>
__device__ void rms_bwd_dw_final(const float* partial, T* out, int rows, int d, int chunks) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    float acc = 0.0f;
    for (int c = 0; c < chunks; ++c) acc += partial[(size_t)c * d + j];
    st(out, (size_t)rows * d + j, acc);
}

// ---- Heads (optionally with RoPE): one thread per pair (i, i + D/2) ------------------
// to_heads: token-major [B,T,H,D] -> head-major [B,H,T,D], rotation sign +1.
// to_tokens: head-major -> token-major, rotation sign -1. cos/sin: [*, D/2] f32, or null.
template <typename T>
__device__ void heads(const T* x, const float* cs, const float* sn, T* y, int B, int Tn, int H, int D, int to_tokens) {
    size_t half = D / 2;
    size_t n = (size_t)B * H * Tn * half;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        size_t i = e % half, rest = e / half;
        size_t src, dst, t;
        if (!to_tokens) {  // output order (b, h, t)
            t = rest % Tn; size_t bh = rest / Tn; size_t h = bh % H, b = bh / H;
            src = ((b * Tn + t) * H + h) * D; dst = ((b * H + h) * Tn + t) * D;
        } else {           // output order (b, t, h)
            size_t h = rest % H; size_t bt = rest / H; t = bt % Tn; size_t b = bt / Tn;
            src = ((b * H + h) * Tn + t) * D; dst = ((b * Tn + t) * H + h) * D;
        }
        float x1 = ld(x, src + i), x2 = ld(x, src + i + half);
        if (cs == 0) { st(y, dst + i, x1); st(y, dst + i + half, x2); continue; }
        float c = cs[t * half + i], s = sn[t * half + i] * (to_tokens ? -1.0f : 1.0f);
        st(y, dst + i, x1 * c - x2 * s);
        st(y, dst + i + half, x2 * c + x1 * s);
    }
}

// ---- Causal softmax: one block per row ------------------------------------------------
template <typename T>
__device__ void softmax_fwd(const T* s, T* p, int tq, int tk, float scale) {
    size_t r = blockIdx.x;
    int visible = (int)(r % tq) + tk - tq + 1;
    const T* row = s + r * tk;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) m = fmaxf(m, ld(row, j) * scale);
    m = block_max(m);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) sum += __expf(ld(row, j) * scale - m);
    float inv = 1.0f / block_sum(sum);
    for (int j = threadIdx.x; j < tk; j += blockDim.x)
        st(p, r * tk + j, j < visible ? __expf(ld(row, j) * scale - m) * inv : 0.0f);
}

template <typename T>
__device__ void softmax_bwd(const T* p, const T* dp, T* ds, int tq, int tk, float scale) {
    size_t r = blockIdx.x;
    int visible = (int)(r % tq) + tk - tq + 1;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) dot += ld(p, r * tk + j) * ld(dp, r * tk + j);
    dot = block_sum(dot);
    for (int j = threadIdx.x; j < tk; j += blockDim.x)
        st(ds, r * tk + j, j < visible ? scale * ld(p, r * tk + j) * (ld(dp, r * tk + j) - dot) : 0.0f);
}

// ---- SwiGLU: element-wise -------------------------------------------------------------
template <typename T>
__device__ void swiglu_fwd(const T* g, const T* u, T* y, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float a = ld(g, i);
        st(y, i, a / (1.0f + __expf(-a)) * ld(u, i));
    }
}

template <typename T>
__device__ void swiglu_bwd(const T* g, const T* u, const T* dy, T* out, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float a = ld(g, i), b = ld(u, i), d = ld(dy, i);
        float s = 1.0f / (1.0f + __expf(-a));
        st(out, i, d * b * s * (1.0f + a * (1.0f - s)));
        st(out, n + i, d * a * s);
    }
}

// ---- Cross-entropy (f32 logits): one block per row ------------------------------------
extern "C" __global__ void ce_fwd_f32(const float* logits, const unsigned int* targets, float* out, int v) {
    size_t r = blockIdx.x;
    unsigned int t = targets[r];
    if (t >= (unsigned int)v) { if (threadIdx.x == 0) out[r] = 0.0f; return; }
    const float* row = logits + r * v;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_max(m);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) sum += __expf(row[j] - m);
    sum = block_sum(sum);
    if (threadIdx.x == 0) out[r] = m + logf(sum) - row[t];
}

// grad_loss: [grad (n); loss (n)].
extern "C" __global__ void ce_bwd_f32(const float* logits, const unsigned int* targets, const float* grad_loss, float* out, int n, int v) {
    size_t r = blockIdx.x;
    unsigned int t = targets[r];
    float* o = out + r * v;
    if (t >= (unsigned int)v) { for (int j = threadIdx.x; j < v; j += blockDim.x) o[j] = 0.0f; return; }
    const float* row = logits + r * v;
    float g = grad_loss[r], lse = grad_loss[n + r] + row[t];
    for (int j = threadIdx.x; j < v; j += blockDim.x) o[j] = __expf(row[j] - lse) * g - (j == (int)t ? g : 0.0f);
}

#define BISTRO_INSTANTIATE(T, S) \
extern "C" __global__ void rms_fwd_##S(const T* x, const T* w, T* y, int d, float eps) { rms_fwd<T>(x, w, y, d, eps); } \
extern "C" __global__ void rms_bwd_dx_##S(const T* x, const T* w, const T* dy, T* out, float* rstd, int d, float eps) { rms_bwd_dx<T>(x, w, dy, out, rstd, d, eps); } \
extern "C" __global__ void rms_bwd_dw_partial_##S(const T* x, const T* dy, const float* rstd, float* partial, int rows, int d, int chunk) { rms_bwd_dw_partial<T>(x, dy, rstd, partial, rows, d, chunk); } \
extern "C" __global__ void rms_bwd_dw_final_##S(const float* partial, T* out, int rows, int d, int chunks) { rms_bwd_dw_final<T>(partial, out, rows, d, chunks); } \
extern "C" __global__ void heads_##S(const T* x, const float* cs, const float* sn, T* y, int B, int Tn, int H, int D, int to_tokens) { heads<T>(x, cs, sn, y, B, Tn, H, D, to_tokens); } \
extern "C" __global__ void softmax_fwd_##S(const T* s, T* p, int tq, int tk, float scale) { softmax_fwd<T>(s, p, tq, tk, scale); } \
extern "C" __global__ void softmax_bwd_##S(const T* p, const T* dp, T* ds, int tq, int tk, float scale) { softmax_bwd<T>(p, dp, ds, tq, tk, scale); } \
extern "C" __global__ void swiglu_fwd_##S(const T* g, const T* u, T* y, size_t n) { swiglu_fwd<T>(g, u, y, n); } \
extern "C" __global__ void swiglu_bwd_##S(const T* g, const T* u, const T* dy, T* out, size_t n) { swiglu_bwd<T>(g, u, dy, out, n); }

BISTRO_INSTANTIATE(float, f32)
BISTRO_INSTANTIATE(bf16_t, bf16)

// ---- AdamW, in place: theta, and moments m = mv[0..n], v = mv[n..2n] ----------------------
extern "C" __global__ void adamw_f32(float* theta, const float* g, float* mv, size_t n, float lr, float decay,
                                     float b1, float b2, float sm, float sv, float eps) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float gi = g[i];
        float m = b1 * mv[i] + (1.0f - b1) * gi;
        float v = b2 * mv[n + i] + (1.0f - b2) * gi * gi;
        mv[i] = m;
        mv[n + i] = v;
        theta[i] = theta[i] * decay - lr * (m * sm) / (sqrtf(v * sv) + eps);
    }
}
