// SparTA-py: unstructured sparse linear layer for CPU, y = act(x @ (W*mask)^T + b), fp32.
//
// Not compiled on its own: sparta.codegen.sparse_cpu prepends a block of #defines that
// specialise it to one weight (shapes, k block, vector width, bias, activation, and the tables'
// sizes); docs/sparse_cpu.md explains the layout and the loops.
//
// Layout (sparta.kernels.sparse_layout.pack_sparse): K is cut into SP_NB blocks of SP_KB inputs.
// The kept weights of row r inside k block b are contiguous, blocks outermost:
//   vals[rowptr[b*N + r] .. rowptr[b*N + r + 1])   float32 values
//   offs[...]                                      uint16 offset of the input inside the
//                                                  block's slice of the x panel, in 8-byte
//                                                  units (k_local * TT / 2)
// rowtot[r] = kept weights of rows < r (to split rows among threads evenly by work).
//
// Tokens are the vector lanes: x is transposed once per call into panels of TT = SP_TV*SP_VL
// tokens, xt[panel][k][token]. One kept weight is one broadcast times SP_TV contiguous vectors
// of the panel, the address being the slice base plus the stored offset (no index arithmetic).
// A k block's slice of a panel (SP_KB * TT floats) stays in L1 while the thread's rows run
// over it; the accumulators of a row go through yt[panel][row][token] between k blocks, and a
// last pass adds the bias, applies the activation and transposes yt into y.
#ifndef SP_N
#error "sparse_linear.cpp is a template: build it through sparta.codegen.sparse_cpu"
#endif

#include <omp.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX2__)
#include <immintrin.h>
#define SP_X86 1
#endif

typedef float vf __attribute__((vector_size(SP_VL * 4)));
typedef float vfu __attribute__((vector_size(SP_VL * 4), aligned(4)));
typedef float v8 __attribute__((vector_size(32)));

static constexpr int TT = SP_TV * SP_VL;        // tokens per panel
static constexpr long KP = (long)SP_NB * SP_KB;  // padded reduction length

static inline vf splat(float s) { return s - vf{}; }  // s - 0 == s exactly: folds away
static inline vf vload(const float* p) { return *(const vfu*)p; }
static inline void vstore(float* p, vf v) { *(vfu*)p = v; }

// @include cpu_act.inc

// One row over one k block of one panel: V token vectors, U independent partial sums per
// vector (U * V >= 8 chains hide the FMA latency on two FMA ports). The row's sums go to (first
// block) or are added to its line of the group's tile.
template <int V>
static inline void row_block(const float* __restrict xs, const float* __restrict w,
                             const uint16_t* __restrict o, int cnt, float* __restrict line,
                             bool first) {
  constexpr int U = 8 / V < 2 ? 2 : 8 / V;
  vf acc[U][V];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[u][v] = splat(0.0f);
  int i = 0;
  for (; i + U <= cnt; i += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const vf b = splat(w[i + u]);
      const float* xp = xs + 2 * (long)o[i + u];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[u][v] += b * vload(xp + v * SP_VL);
    }
  }
  for (; i < cnt; ++i) {
    const vf b = splat(w[i]);
    const float* xp = xs + 2 * (long)o[i];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[0][v] += b * vload(xp + v * SP_VL);
  }
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) {
    vf s = acc[0][v];
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u) s += acc[u][v];
    if (!first) s += vload(line + v * SP_VL);
    vstore(line + v * SP_VL, s);
  }
}

// Rows [ra, rb) of one panel over one k block (slice xs): row r's sums go to (first) or are
// added to lines + (r - ra) * TT.
template <int V>
static void rows_block(const float* __restrict xs, const float* __restrict vals,
                       const uint16_t* __restrict offs, const int32_t* __restrict rp, int ra,
                       int rb, float* __restrict lines, bool first) {
  for (int r = ra; r < rb; ++r) {
    const int32_t s = rp[r];
    row_block<V>(xs, vals + s, offs + s, rp[r + 1] - s, lines + (long)(r - ra) * TT, first);
  }
}

typedef void (*rows_fn)(const float*, const float*, const uint16_t*, const int32_t*, int, int,
                        float*, bool);
template <int... I>
static constexpr std::array<rows_fn, sizeof...(I)> make_table(std::integer_sequence<int, I...>) {
  return {rows_block<I + 1>...};
}
static rows_fn pick_rows(int v) {
  static constexpr auto table = make_table(std::make_integer_sequence<int, SP_TV>{});
  return table[(v < 1 ? 1 : v) - 1];
}

#if SP_X86
// In-register transpose of 8 x 8 floats: r[i][j] -> r[j][i].
static inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

static inline __m256i lane_mask(long n) {  // lanes < n set
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 0 ? 0 : (n > 8 ? 8 : n))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

// x (T, SP_K) -> xt[k][t] for the panel's tokens [t0, t0 + tn) and k in [k0, k1) (k0 % 8 == 0),
// zero for tokens >= T and k >= SP_K; tn is a multiple of 8.
static inline void transpose_x(const float* __restrict x, long T, long t0, long tn, long k0,
                               long k1, float* __restrict dst) {
#if SP_X86
  for (long k = k0; k < k1; k += 8) {
    const __m256i mk = lane_mask(SP_K - k);
    const long kn = k1 - k < 8 ? k1 - k : 8;
    for (long tb = 0; tb < tn; tb += 8) {
      __m256 r[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i)
        r[i] = t0 + tb + i < T ? _mm256_maskload_ps(x + (t0 + tb + i) * SP_K + k, mk)
                               : _mm256_setzero_ps();
      transpose8(r);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j)
        if (j < kn) _mm256_storeu_ps(dst + (k + j) * TT + tb, r[j]);
    }
  }
#else
  for (long k = k0; k < k1; ++k)
    for (long t = 0; t < tn; ++t)
      dst[k * TT + t] = (t0 + t < T && k < SP_K) ? x[(t0 + t) * SP_K + k] : 0.0f;
#endif
}

// One group's tile (rn <= 8 rows of TT tokens) -> y[t][g + i] = act(tile[i][t] + bias[g + i])
// for tokens [t0, t0 + tn): the epilogue, fused into the group's loop while the tile is in L1.
static inline void store_tile(const float* __restrict tile, long t0, long tn, int g, int rn,
                              const float* __restrict bias, float* __restrict y) {
#if SP_X86
  const __m256i mr = lane_mask(rn);
  v8 bv = v8{};
  if (SP_HAS_BIAS) bv = (v8)_mm256_maskload_ps(bias + g, mr);
  for (long tb = 0; tb < tn; tb += 8) {
    __m256 a[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)
      a[i] = i < rn ? _mm256_load_ps(tile + i * TT + tb) : _mm256_setzero_ps();
    transpose8(a);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      if (tb + j >= tn) break;
      const v8 z = act_apply<SP_ACT>((v8)a[j] + bv);
      // a masked store is microcoded on AMD (~10x a plain one): only for a ragged group
      if (rn == 8) _mm256_storeu_ps(y + (t0 + tb + j) * SP_N + g, (__m256)z);
      else _mm256_maskstore_ps(y + (t0 + tb + j) * SP_N + g, mr, (__m256)z);
    }
  }
#else
  for (long t = 0; t < tn; ++t)
    for (int i = 0; i < rn; ++i) {
      typedef float v1 __attribute__((vector_size(4)));
      v1 z = v1{} + (tile[i * TT + t] + (SP_HAS_BIAS ? bias[g + i] : 0.0f));
      y[(t0 + t) * SP_N + g + i] = act_apply<SP_ACT>(z)[0];
    }
#endif
}

// First row of thread tid's share: rows split by kept weights, in multiples of 8 rows.
static inline int split_row(const int32_t* rowtot, int tid, int nth) {
  if (tid <= 0) return 0;
  if (tid >= nth) return SP_N;
  const long target = (long)rowtot[SP_N] * tid / nth;
  int lo = 0, hi = SP_N;  // first row whose prefix reaches the target
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (rowtot[mid] < target) lo = mid + 1; else hi = mid;
  }
  const int r = (lo + 4) / 8 * 8;
  return r > SP_N ? SP_N : r;
}

extern "C" {

int sp_abi_version(void) { return 1; }

// Scratch floats for T tokens: the transposed x panels, and with several k blocks the rows'
// partial sums of every panel.
long sp_scratch_floats(long T) {
  const long panels = (T + TT - 1) / TT;
  return panels * (KP + (SP_NB > 1 ? SP_N : 0)) * TT;
}

// x: (T, SP_K) row-major; vals/offs/rowptr/rowtot: the packed weight; bias: (SP_N) or null;
// y: (T, SP_N); scratch: sp_scratch_floats(T) floats.
int sp_forward(const float* x, long T, const float* vals, const uint16_t* offs,
               const int32_t* rowptr, const int32_t* rowtot, const float* bias, float* y,
               float* scratch, int nthreads) {
  if (T <= 0) return 0;
  static_assert(SP_TV >= 1 && SP_TV <= 8 && TT % 8 == 0, "SP_TV * SP_VL: a multiple of 8");
  static_assert((long)SP_KB * TT / 2 <= 65536, "offsets are uint16 in 8-byte units");
  const long panels = (T + TT - 1) / TT;
  float* xt = scratch;
  float* yt = scratch + panels * KP * TT;  // used when SP_NB > 1
  const long kround = (SP_K + 7) / 8 * 8;
  const long kchunks = (kround + 63) / 64;
  if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    alignas(64) float tile[8 * TT];
    // Panel p for rows [r0, r1) (x already transposed into xt): the rows over every k block,
    // then the epilogue writes their columns of y, 8 rows at a time. One k block: a group of
    // 8 rows at a time, its sums in a tile kept in L1. Several: a k block's slice of x is read
    // by all the rows before the next (the slice stays in cache), the partial sums go through yt.
    auto run_panel = [&](long p, int r0, int r1) {
      const long rem = T - p * TT, tn = rem >= TT ? TT : rem;
      const rows_fn fn = pick_rows(rem >= TT ? SP_TV : (int)((rem + SP_VL - 1) / SP_VL));
      const float* xp = xt + p * KP * TT;
      if (SP_NB == 1) {
        for (int g = r0; g < r1; g += 8) {
          const int rn = r1 - g < 8 ? r1 - g : 8;
          fn(xp, vals, offs, rowptr, g, g + rn, tile, true);
          store_tile(tile, p * TT, tn, g, rn, bias, y);
        }
      } else {
        float* ytp = yt + p * SP_N * TT;
        for (int b = 0; b < SP_NB; ++b)
          fn(xp + (long)b * SP_KB * TT, vals, offs, rowptr + (long)b * SP_N, r0, r1,
             ytp + (long)r0 * TT, b == 0);
        for (int g = r0; g < r1; g += 8)
          store_tile(ytp + (long)g * TT, p * TT, tn, g, r1 - g < 8 ? r1 - g : 8, bias, y);
      }
    };
    // every lane the compute reads is written (zeros past T): no stale bits in the FMAs
    auto lanes = [&](long p) {
      const long rem = T - p * TT;
      return rem >= TT ? TT : (rem + SP_VL - 1) / SP_VL * SP_VL;
    };
    if (panels >= 2 * nth && (panels % nth == 0 || panels >= 4 * nth)) {
      // Many panels: each thread takes a run of whole panels (runs within one panel of each
      // other in length), transposes one and runs every row over it while it is still in L2
      // (no barrier, no trip through L3).
      const long pa = panels * tid / nth, pb = panels * (tid + 1) / nth;
      for (long p = pa; p < pb; ++p) {
        transpose_x(x, T, p * TT, lanes(p), 0, kround, xt + p * KP * TT);
        run_panel(p, 0, SP_N);
      }
    } else {
      // Few panels: the threads share each panel's transpose (64-input chunks), meet at a
      // barrier, then each runs its rows (split by kept weights) over every panel.
      for (long p = 0; p < panels; ++p)
        for (long c = tid; c < kchunks; c += nth) {
          const long k0 = c * 64, k1 = k0 + 64 < kround ? k0 + 64 : kround;
          transpose_x(x, T, p * TT, lanes(p), k0, k1, xt + p * KP * TT);
        }
#pragma omp barrier
      const int r0 = split_row(rowtot, tid, nth), r1 = split_row(rowtot, tid + 1, nth);
      for (long p = 0; p < panels; ++p) run_panel(p, r0, r1);
    }
  }
  return 0;
}

}  // extern "C"
