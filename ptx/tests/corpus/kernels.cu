// Test corpus for the devproxy PTX interpreter. Compiled by NVRTC (compute_90) at test time.
// Kernels are extern "C" so their PTX names are unmangled.

__device__ int g_counter = 7;
__device__ float g_table[4] = {1.5f, -2.0f, 3.25f, 0.0f};
__constant__ int c_coeffs[8] = {1, 2, 3, 4, 5, 6, 7, 8};
__device__ int g_written;

extern "C" __global__ void saxpy(int n, float a, const float* x, float* y) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}

extern "C" __global__ void daxpy_grid_stride(int n, double a, const double* x, double* y) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        y[i] = fma(a, x[i], y[i]) + x[i] * y[i] - a / (x[i] + 3.0);
}

extern "C" __global__ void int_ops(int n, const int* a, const int* b, int* out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int x = a[i], y = b[i];
    int yy = (y == 0) ? 1 : y;
    unsigned ux = (unsigned)x, uy = (unsigned)yy;
    out[i * 12 + 0] = x / yy;
    out[i * 12 + 1] = x % yy;
    out[i * 12 + 2] = (int)(ux / uy);
    out[i * 12 + 3] = (int)(ux % uy);
    out[i * 12 + 4] = __mulhi(x, y);
    out[i * 12 + 5] = (int)__umulhi(ux, (unsigned)y);
    out[i * 12 + 6] = (x << (y & 31)) ^ (int)(ux >> (y & 15)) ^ (x >> 3);
    out[i * 12 + 7] = min(x, y) + max(x, y) * 3 - abs(x);
    out[i * 12 + 8] = __popc(ux) + 100 * __clz(x);
    out[i * 12 + 9] = (int)__brev(ux);
    out[i * 12 + 10] = (int)((ux >> 5) & 0x3ff) + (int)__byte_perm(ux, (unsigned)y, 0x3210 + (i & 0x7));
    long long w = (long long)x * (long long)y;
    out[i * 12 + 11] = (int)(w >> 17) + (int)(__mul64hi(w, 12345678901LL));
}

extern "C" __global__ void reduce_sum(const float* in, float* out, int n) {
    __shared__ float s[256];
    int tid = threadIdx.x;
    int i = blockIdx.x * blockDim.x * 2 + threadIdx.x;
    float v = 0.0f;
    if (i < n) v = in[i];
    if (i + blockDim.x < n) v += in[i + blockDim.x];
    s[tid] = v;
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (tid < stride) s[tid] += s[tid + stride];
        __syncthreads();
    }
    if (tid == 0) out[blockIdx.x] = s[0];
}

extern "C" __global__ void atomics(int n, const int* in, int* iacc, float* facc, double* dacc, unsigned* uacc) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int v = in[i];
    atomicAdd(&iacc[0], v);
    atomicMax(&iacc[1], v);
    atomicMin(&iacc[2], v);
    atomicAdd(&facc[0], (float)(v & 0xff) * 0.5f);
    atomicAdd(&dacc[0], (double)v * 0.25);
    atomicInc(&uacc[0], 100u);
    atomicDec(&uacc[1], 1000u);
    atomicOr(&uacc[2], 1u << (v & 31));
    atomicAnd(&uacc[3], ~(1u << (i & 31)));
    atomicXor(&uacc[4], (unsigned)v);
    atomicExch(&iacc[3], 42);
    // CAS loop implementing old + 2v + 1 (order independent, so the result is checkable).
    int old = iacc[4], assumed;
    do {
        assumed = old;
        old = atomicCAS(&iacc[4], assumed, assumed + 2 * v + 1);
    } while (assumed != old);
    atomicAdd((unsigned long long*)&dacc[1], 1ull);
}

extern "C" __global__ void warp_reduce(const int* in, int* out, unsigned* ballots, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int v = (i < n) ? in[i] : 0;
    int lane = threadIdx.x & 31;
    int s = v;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffff, s, o);
    int x = v;
    for (int o = 1; o < 32; o <<= 1) x = max(x, __shfl_xor_sync(0xffffffff, x, o));
    int up = v;
    for (int o = 1; o < 32; o <<= 1) { int t = __shfl_up_sync(0xffffffff, up, o); if (lane >= o) up += t; }
    int bc = __shfl_sync(0xffffffff, v, 3);
    unsigned b = __ballot_sync(0xffffffff, v > 10);
    int all = __all_sync(0xffffffff, v >= 0);
    int any = __any_sync(0xffffffff, v > 90);
    if (i < n) {
        out[i * 4 + 0] = up;
        out[i * 4 + 1] = bc;
        out[i * 4 + 2] = (lane == 0) ? s : -1;
        out[i * 4 + 3] = x + all * 1000 + any * 10000;
    }
    if (lane == 0) ballots[i / 32] = b;
}

#define TILE 16
extern "C" __global__ void matmul_tiled(const float* A, const float* B, float* C, int M, int N, int K) {
    __shared__ float As[TILE][TILE];
    __shared__ float Bs[TILE][TILE];
    int row = blockIdx.y * TILE + threadIdx.y;
    int col = blockIdx.x * TILE + threadIdx.x;
    float acc = 0.0f;
    for (int t = 0; t < (K + TILE - 1) / TILE; ++t) {
        int ak = t * TILE + threadIdx.x;
        int bk = t * TILE + threadIdx.y;
        As[threadIdx.y][threadIdx.x] = (row < M && ak < K) ? A[row * K + ak] : 0.0f;
        Bs[threadIdx.y][threadIdx.x] = (bk < K && col < N) ? B[bk * N + col] : 0.0f;
        __syncthreads();
#pragma unroll
        for (int k = 0; k < TILE; ++k) acc += As[threadIdx.y][k] * Bs[k][threadIdx.x];
        __syncthreads();
    }
    if (row < M && col < N) C[row * N + col] = acc;
}

// One block per row; two passes (max, then sum of exp).
extern "C" __global__ void softmax_rows(const float* in, float* out, int cols) {
    __shared__ float red[128];
    const float* row = in + blockIdx.x * cols;
    float* orow = out + blockIdx.x * cols;
    float m = -__int_as_float(0x7f800000);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, row[c]);
    red[threadIdx.x] = m;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
        __syncthreads();
    }
    m = red[0];
    __syncthreads();
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += expf(row[c] - m);
    red[threadIdx.x] = sum;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    sum = red[0];
    for (int c = threadIdx.x; c < cols; c += blockDim.x) orow[c] = expf(row[c] - m) / sum;
}

// Hillis-Steele inclusive scan within one block (blockDim.x <= 512), double buffered.
extern "C" __global__ void scan_block(const int* in, int* out, int n) {
    __shared__ int buf[2][512];
    int t = threadIdx.x;
    int base = blockIdx.x * blockDim.x;
    int pin = 0;
    buf[0][t] = (base + t < n) ? in[base + t] : 0;
    __syncthreads();
    for (int off = 1; off < blockDim.x; off <<= 1) {
        int pout = 1 - pin;
        int v = buf[pin][t];
        if (t >= off) v += buf[pin][t - off];
        buf[pout][t] = v;
        pin = pout;
        __syncthreads();
    }
    if (base + t < n) out[base + t] = buf[pin][t];
}

extern "C" __global__ void histogram(const unsigned char* data, int n, unsigned* bins) {
    __shared__ unsigned local[64];
    for (int b = threadIdx.x; b < 64; b += blockDim.x) local[b] = 0;
    __syncthreads();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        atomicAdd(&local[data[i] & 63], 1u);
    __syncthreads();
    for (int b = threadIdx.x; b < 64; b += blockDim.x) atomicAdd(&bins[b], local[b]);
}

struct Params {
    float scale;
    int offset;
    double bias;
    char tag;
    int dims[3];
};

extern "C" __global__ void struct_by_value(Params p, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = p.scale * (float)(i + p.offset) + (float)p.bias + (float)p.tag + (float)(p.dims[0] * p.dims[1] - p.dims[2]);
}

__device__ __noinline__ int collatz_steps(long long x) {
    int steps = 0;
    while (x != 1 && steps < 1000) {
        x = (x & 1) ? 3 * x + 1 : x / 2;
        ++steps;
    }
    return steps;
}
__device__ __noinline__ float poly(float x, int k) {
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) acc = acc * x + (float)c_coeffs[j & 7];
    return acc;
}
__device__ __noinline__ float chain(float x, int i) {
    return poly(x, (i & 7) + 1) + (float)collatz_steps(i + 1);
}

extern "C" __global__ void device_calls(float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = chain(0.5f + 0.001f * i, i);
}

// Loop with a data-dependent early exit per thread (divergent break).
extern "C" __global__ void divergent_search(const int* data, int len, const int* keys, int* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int key = keys[i];
    int found = -1;
    for (int j = 0; j < len; ++j) {
        if (data[j] == key) { found = j; break; }
        if (data[j] > key * 4) { found = -2 - j; break; }
    }
    out[i] = found;
}

__device__ __forceinline__ unsigned short f2h(float x) { unsigned short r; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r; }
__device__ __forceinline__ float h2f(unsigned short h) { float r; asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h)); return r; }
__device__ __forceinline__ unsigned short f2bf(float x) { unsigned short r; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r; }
__device__ __forceinline__ float bf2f(unsigned short h) { float r; asm("{ .reg .b32 t; mov.b32 t, {0, %1}; mov.b32 %0, t; }" : "=f"(r) : "h"(h)); return r; }

extern "C" __global__ void half_conv(const float* in, unsigned short* h, unsigned short* bf, float* back, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned short a = f2h(in[i]);
    unsigned short b = f2bf(in[i]);
    h[i] = a;
    bf[i] = b;
    back[2 * i] = h2f(a);
    back[2 * i + 1] = bf2f(b);
}

extern "C" __global__ void dyn_shared_reverse(const int* in, int* out, int n) {
    extern __shared__ int sdata[];
    int t = threadIdx.x;
    int i = blockIdx.x * blockDim.x + t;
    sdata[t] = (i < n) ? in[i] : -1;
    __syncthreads();
    int j = blockIdx.x * blockDim.x + (blockDim.x - 1 - t);
    if (j < n) out[j] = sdata[t];
}

extern "C" __global__ void globals_const(float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = g_table[i & 3] * (float)c_coeffs[i & 7] + (float)g_counter;
    if (i == 0) g_written = g_counter * 2 + 1;
}

extern "C" __global__ void grid3d(int* out, int nx, int ny, int nz) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    int z = blockIdx.z * blockDim.z + threadIdx.z;
    if (x < nx && y < ny && z < nz) {
        int lin = (z * ny + y) * nx + x;
        out[lin] = x * 10000 + y * 100 + z + (int)(gridDim.x * 1000000 + gridDim.y * 100000 + gridDim.z * 10000);
    }
}

extern "C" __global__ void warp_misc(const int* in, int* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int lane = threadIdx.x & 31;
    int v = (i < n) ? in[i] : 0;
    unsigned key = (unsigned)(v & 3);
    unsigned m = __match_any_sync(0xffffffff, key);
    __syncwarp();
    int r = __reduce_add_sync(0xffffffff, v);
    unsigned mx = __reduce_max_sync(0xffffffff, (unsigned)v);
    if (i < n) {
        out[i * 3 + 0] = (int)m;
        out[i * 3 + 1] = r;
        out[i * 3 + 2] = (int)mx + lane;
    }
}

extern "C" __global__ void float_math(const float* in, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = in[i];
    out[i * 8 + 0] = sqrtf(fabsf(x));
    out[i * 8 + 1] = x / (x * x + 1.0f);
    out[i * 8 + 2] = __expf(x * 0.1f);
    out[i * 8 + 3] = __logf(fabsf(x) + 1.0f);
    out[i * 8 + 4] = __sinf(x) + __cosf(x);
    out[i * 8 + 5] = tanhf(x * 0.01f);
    out[i * 8 + 6] = rsqrtf(fabsf(x) + 1.0f);
    out[i * 8 + 7] = (float)(int)floorf(x) + truncf(x * 0.5f) + ceilf(x) + rintf(x) + (float)__float2int_rn(x) + copysignf(2.0f, x);
}
