// SparTA-py: n:m sparse linear layer for CPU, y = act(x @ (W*mask)^T + b), fp32.
//
// Not compiled on its own: sparta.codegen.nm_cpu prepends a block of #defines that specialise it
// to one weight (n, m, shapes, tile sizes, ISA vector width, bias, activation); see
// docs/nm_cpu.md for the layout and the loop structure.
//
// Layout (built once by sparta.kernels.nm_layout.pack_nm): output rows are cut into tiles of
// NM_R rows; for row tile rt, chunk c (NM_M consecutive inputs) and pick j < NM_N the NM_R
// values are stored densely, vals[rt][c][j][r], with the position of each pick inside its chunk
// in idx[rt][c][j][r] (uint8). A row keeping fewer than n values in a chunk gets zero-valued
// picks. Tokens are the vector dimension: x is transposed once per call into panels of
// NM_TV * NM_VL tokens, xt[panel][k][token], so one pick is one broadcast weight times NM_TV
// contiguous activation vectors, accumulated in registers across the whole reduction.
#ifndef NM_N
#error "nm_linear.cpp is a template: build it through sparta.codegen.nm_cpu"
#endif

#include <omp.h>

#include <cstdint>
#include <cstring>

typedef float vf __attribute__((vector_size(NM_VL * 4)));
typedef float vfu __attribute__((vector_size(NM_VL * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(NM_VL * 4)));

static constexpr int TT = NM_TV * NM_VL;  // tokens per panel
static constexpr long KP = (long)NM_C * NM_M;  // padded reduction length
static constexpr int NT = (NM_OUT + NM_R - 1) / NM_R;  // row tiles

static inline vf splat(float s) { return vf{} + s; }
static inline vf vload(const float* p) { return *(const vfu*)p; }
static inline void vstore(float* p, vf v) { *(vfu*)p = v; }
static inline vf vsel(vi c, vf a, vf b) { return (vf)((c & (vi)a) | (~c & (vi)b)); }

// exp for the activations: Cody-Waite range reduction, degree-6 polynomial, relative error ~1e-7.
static inline vf vexp(vf x) {
  x = vsel(x < splat(-87.3f), splat(-87.3f), x);
  x = vsel(x > splat(88.3f), splat(88.3f), x);
  vf fx = x * 1.44269504088896341f;
  fx = fx + vsel(fx >= splat(0.0f), splat(0.5f), splat(-0.5f));
  vi n = __builtin_convertvector(fx, vi);  // round half away from zero
  vf fn = __builtin_convertvector(n, vf);
  vf r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi e = (n + 127) << 23;
  return p * (vf)e;
}

// erf after Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7).
static inline vf verf(vf x) {
  vi neg = x < splat(0.0f);
  vf a = vsel(neg, -x, x);
  vf t = 1.0f / (a * 0.3275911f + 1.0f);
  vf p = splat(1.061405429f);
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  vf y = 1.0f - p * t * vexp(-a * a);
  return vsel(neg, -y, y);
}

static inline vf activate(vf z) {
#if NM_ACT == 1
  return vsel(z > splat(0.0f), z, splat(0.0f));
#elif NM_ACT == 2
  return 0.5f * z * (1.0f + verf(z * 0.70710678118654752f));
#elif NM_ACT == 3
  vf u = 0.7978845608028654f * (z + 0.044715f * z * z * z);
  vf th = 1.0f - 2.0f / (vexp(2.0f * u) + 1.0f);
  return 0.5f * z * (1.0f + th);
#else
  return z;
#endif
}

// One row tile x one token panel x one block of chunks [c0, c1). Accumulators live in
// registers: NM_R rows x V vectors of NM_VL tokens.
template <int V>
static inline void tile(const float* __restrict xt, const float* __restrict w,
                        const uint8_t* __restrict id, int c0, int c1, float* __restrict yb,
                        bool first, bool last, int rt, long t0, long T, const float* __restrict bias,
                        float* __restrict y) {
  vf acc[NM_R][V];
  if (first) {
#pragma GCC unroll 16
    for (int r = 0; r < NM_R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] = splat(0.0f);
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < NM_R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] = vload(yb + r * TT + v * NM_VL);
  }
  const float* wc = w + (long)c0 * NM_N * NM_R;
  const uint8_t* ic = id + (long)c0 * NM_N * NM_R;
  const float* xc = xt + (long)c0 * NM_M * TT;
  for (int c = c0; c < c1; ++c) {
#pragma GCC unroll 16
    for (int j = 0; j < NM_N; ++j) {
#pragma GCC unroll 16
      for (int r = 0; r < NM_R; ++r) {
        const vf b = splat(wc[j * NM_R + r]);
        const float* xp = xc + (long)ic[j * NM_R + r] * TT;
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) acc[r][v] += b * vload(xp + v * NM_VL);
      }
    }
    wc += NM_N * NM_R;
    ic += NM_N * NM_R;
    xc += NM_M * TT;
  }
  if (!last) {
#pragma GCC unroll 16
    for (int r = 0; r < NM_R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) vstore(yb + r * TT + v * NM_VL, acc[r][v]);
    return;
  }
  // Epilogue: bias, activation (vectorised over tokens), then transpose into y[t][row].
  alignas(64) float out[V * NM_VL][NM_R];
#pragma GCC unroll 16
  for (int r = 0; r < NM_R; ++r) {
    const int row = rt * NM_R + r;
    const float bv = (NM_HAS_BIAS && row < NM_OUT) ? bias[row] : 0.0f;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      alignas(64) float z[NM_VL];
      vstore(z, activate(acc[r][v] + bv));
      for (int l = 0; l < NM_VL; ++l) out[v * NM_VL + l][r] = z[l];
    }
  }
  const int rows = (rt * NM_R + NM_R <= NM_OUT) ? NM_R : NM_OUT - rt * NM_R;
  const long tn = (T - t0 < V * NM_VL) ? T - t0 : V * NM_VL;
  for (long t = 0; t < tn; ++t)
    std::memcpy(y + (t0 + t) * NM_OUT + (long)rt * NM_R, out[t], sizeof(float) * rows);
}

typedef void (*tile_fn)(const float*, const float*, const uint8_t*, int, int, float*, bool, bool,
                        int, long, long, const float*, float*);

template <int V>
static void tile_entry(const float* xt, const float* w, const uint8_t* id, int c0, int c1,
                       float* yb, bool first, bool last, int rt, long t0, long T,
                       const float* bias, float* y) {
  tile<V>(xt, w, id, c0, c1, yb, first, last, rt, t0, T, bias, y);
}

static tile_fn pick_tile(int v) {
  static const tile_fn table[4] = {tile_entry<1>, tile_entry<(NM_TV > 1 ? 2 : 1)>,
                                   tile_entry<(NM_TV > 2 ? 3 : 1)>, tile_entry<(NM_TV > 3 ? 4 : 1)>};
  return table[(v < 1 ? 1 : v) - 1];
}

extern "C" {

int nm_abi_version(void) { return 1; }

long nm_xt_floats(long T) { return ((T + TT - 1) / TT) * KP * TT; }

long nm_ybuf_floats(void) { return NM_KBC >= NM_C ? 0 : (long)NT * NM_R * TT; }

// x: (T, NM_K) row-major; vals/idx: packed weight; bias: (NM_OUT) or null; y: (T, NM_OUT);
// xt: nm_xt_floats(T) floats of scratch; ybuf: nm_ybuf_floats() floats of scratch.
int nm_forward(const float* x, long T, const float* vals, const uint8_t* idx, const float* bias,
               float* y, float* xt, float* ybuf, int nthreads) {
  if (T <= 0) return 0;
  static_assert(NM_TV >= 1 && NM_TV <= 4, "NM_TV must be in 1..4");
  const long panels = (T + TT - 1) / TT;
  const long kblocks = (KP + 63) / 64;
  if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
  {
    // 1. Transpose x into token panels (zero-padded in tokens and in k).
#pragma omp for schedule(static)
    for (long b = 0; b < panels * kblocks; ++b) {
      const long p = b / kblocks, k0 = (b % kblocks) * 64;
      const long k1 = k0 + 64 < KP ? k0 + 64 : KP;
      float* dst = xt + p * KP * TT;
      for (long t = 0; t < TT; ++t) {
        const long tok = p * TT + t;
        if (tok < T) {
          const float* src = x + tok * NM_K;
          for (long k = k0; k < k1; ++k) dst[k * TT + t] = k < NM_K ? src[k] : 0.0f;
        } else {
          for (long k = k0; k < k1; ++k) dst[k * TT + t] = 0.0f;
        }
      }
    }
    // 2. Each thread owns a contiguous range of row tiles, for every panel and k block.
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int rt0 = (int)((long)NT * tid / nth), rt1 = (int)((long)NT * (tid + 1) / nth);
    for (long p = 0; p < panels; ++p) {
      const long t0 = p * TT;
      const long rem = T - t0;
      const int v = rem >= TT ? NM_TV : (int)((rem + NM_VL - 1) / NM_VL);
      const tile_fn fn = pick_tile(v);
      const float* xp = xt + p * KP * TT;
      for (int c0 = 0; c0 < NM_C; c0 += NM_KBC) {
        const int c1 = c0 + NM_KBC < NM_C ? c0 + NM_KBC : NM_C;
        for (int rt = rt0; rt < rt1; ++rt) {
          const long off = (long)rt * NM_C * NM_N * NM_R;
          float* yb = ybuf ? ybuf + (long)rt * NM_R * TT : nullptr;
          fn(xp, vals + off, idx + off, c0, c1, yb, c0 == 0, c1 == NM_C, rt, t0, T, bias, y);
        }
      }
    }
  }
  return 0;
}

}  // extern "C"
