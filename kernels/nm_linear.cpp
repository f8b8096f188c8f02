// SparTA-py: n:m sparse linear layer for CPU, y = act(x @ (W*mask)^T + b), fp32.
//
// Not compiled on its own: sparta.codegen.nm_cpu prepends a block of #defines that specialise it
// to one weight (n, m, shapes, tile sizes, ISA vector width, bias, activation) and appends
// nm_perm.cpp (the permute path); see docs/nm_cpu.md for the layout and the loop structure.
//
// Layout (built once by sparta.kernels.nm_layout.pack_nm): output rows are cut into tiles of
// NM_R rows; for row tile rt, chunk c (NM_M consecutive inputs) and pick j < NM_N the NM_R
// values are stored densely, vals[rt][c][j][r], with the position of each pick inside its chunk
// in idx[rt][c][j][r] (uint8). A row keeping fewer than n values in a chunk gets zero-valued
// picks. Two paths compute with it:
// - tile (NM_PERM 0): tokens are the vector dimension: x is transposed once per call into panels
//   of NM_TV * NM_VL tokens, xt[panel][k][token], so one pick is one broadcast weight times
//   NM_TV contiguous activation vectors, accumulated in registers over a k block.
// - perm (NM_PERM 1, AVX-512, n * R == 16): the n * R values of a chunk are one 16-lane vector;
//   per token the chunk's inputs are permuted into the lanes by the indices (perm_forward).
// Few tokens (decode: 1-3, or 1-8 on the AVX-512 tile layout) take a third path (small_t).
#ifndef NM_N
#error "nm_linear.cpp is a template: build it through sparta.codegen.nm_cpu"
#endif

#include <omp.h>

#include <array>
#include <cstdint>
#include <utility>
#include <cstring>

#if defined(__AVX512F__) && NM_VL == 16
#include <immintrin.h>
#define NM_AVX512 1
#elif defined(__AVX2__) && NM_VL == 8
#include <immintrin.h>
#define NM_AVX2 1
#endif

typedef float vf __attribute__((vector_size(NM_VL * 4)));
typedef float vfu __attribute__((vector_size(NM_VL * 4), aligned(4)));

static constexpr int TT = NM_TV * NM_VL;  // tokens per panel
static constexpr long KP = (long)NM_C * NM_M;  // padded reduction length
static constexpr int NT = (NM_OUT + NM_R - 1) / NM_R;  // row tiles

static inline vf splat(float s) { return s - vf{}; }
static inline vf vload(const float* p) { return *(const vfu*)p; }
static inline void vstore(float* p, vf v) { *(vfu*)p = v; }

// @include cpu_act.inc

static inline vf activate(vf z) { return act_apply<NM_ACT>(z); }

#if NM_AVX512
// 8 rows x 16 tokens -> y[t * NM_OUT + r] for tokens t < tn and rows r with bit r of mask set
// (mu: rows 0-3, mw: rows 4-7). Each 128-bit lane of a transposed vector holds 4 rows of one
// token; a masked store writes just that lane, so y is written directly with no staging pass.
static inline void store_transposed16(const __m512* a, float* y, long tn, unsigned mu,
                                      unsigned mw) {
  const __m512 t0 = _mm512_unpacklo_ps(a[0], a[1]), t1 = _mm512_unpackhi_ps(a[0], a[1]);
  const __m512 t2 = _mm512_unpacklo_ps(a[2], a[3]), t3 = _mm512_unpackhi_ps(a[2], a[3]);
  const __m512 t4 = _mm512_unpacklo_ps(a[4], a[5]), t5 = _mm512_unpackhi_ps(a[4], a[5]);
  const __m512 t6 = _mm512_unpacklo_ps(a[6], a[7]), t7 = _mm512_unpackhi_ps(a[6], a[7]);
  // u[i] / w[i]: 128-bit lane L holds rows 0-3 / 4-7 of token 4L + i.
  const __m512 u[4] = {_mm512_shuffle_ps(t0, t2, 0x44), _mm512_shuffle_ps(t0, t2, 0xEE),
                       _mm512_shuffle_ps(t1, t3, 0x44), _mm512_shuffle_ps(t1, t3, 0xEE)};
  const __m512 w[4] = {_mm512_shuffle_ps(t4, t6, 0x44), _mm512_shuffle_ps(t4, t6, 0xEE),
                       _mm512_shuffle_ps(t5, t7, 0x44), _mm512_shuffle_ps(t5, t7, 0xEE)};
#pragma GCC unroll 4
  for (int l = 0; l < 4; ++l)
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const long t = 4 * l + i;
      if (t >= tn) continue;
      _mm512_mask_storeu_ps(y + t * NM_OUT - 4 * l, (__mmask16)(mu << (4 * l)), u[i]);
      if (NM_R > 4) _mm512_mask_storeu_ps(y + t * NM_OUT + 4 - 4 * l, (__mmask16)(mw << (4 * l)), w[i]);
    }
}

// In-register transpose of 16 x 16 floats: r[i][j] -> r[j][i].
static inline void transpose16(__m512* r) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  // r[4i + j], 128-bit lane L: rows 4i..4i+3 of column 4L + j
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
    r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xDD);
  }
}
#endif

// x (T, NM_K) -> xt[k][t] for tokens t0 + [0, TT) and k in [k0, k1), zero-padded.
static inline void transpose_x(const float* __restrict x, long T, long t0, long k0, long k1,
                               float* __restrict dst) {
#if NM_AVX512
  // 16 tokens x 16 k at a time: 16 row loads (masked at the k end), one register transpose,
  // 16 stores; every line of x is read once (gathers at a stride of K floats thrash L1 sets).
  for (int v = 0; v < NM_TV; ++v) {
    const long tb = t0 + v * NM_VL;
    const long valid = T - tb < 0 ? 0 : (T - tb < NM_VL ? T - tb : NM_VL);
    for (long k = k0; k < k1; k += 16) {
      const long kin = NM_K - k;
      const __mmask16 mk = kin >= 16 ? (__mmask16)0xFFFF : (kin <= 0 ? (__mmask16)0 : (__mmask16)((1u << kin) - 1u));
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = i < valid ? _mm512_maskz_loadu_ps(mk, x + (tb + i) * NM_K + k) : _mm512_setzero_ps();
      transpose16(r);
      const long kn = k1 - k < 16 ? k1 - k : 16;
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j)
        if (j < kn) _mm512_storeu_ps(dst + (k + j) * TT + v * NM_VL, r[j]);
    }
  }
#elif NM_AVX2
  for (int v = 0; v < NM_TV; ++v) {
    const long tb = t0 + v * NM_VL;
    const long valid = T - tb < 0 ? 0 : (T - tb < NM_VL ? T - tb : NM_VL);
    const __m256i vidx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                            _mm256_set1_epi32(NM_K));
    const __m256 mk = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
        _mm256_set1_epi32((int)valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    for (long k = k0; k < k1; ++k) {
      __m256 g = _mm256_setzero_ps();
      if (k < NM_K && valid > 0)
        g = _mm256_mask_i32gather_ps(g, x + tb * NM_K + k, vidx, mk, 4);
      _mm256_storeu_ps(dst + k * TT + v * NM_VL, g);
    }
  }
#else
  for (long t = 0; t < TT; ++t) {
    const long tok = t0 + t;
    if (tok < T) {
      const float* src = x + tok * NM_K;
      for (long k = k0; k < k1; ++k) dst[k * TT + t] = k < NM_K ? src[k] : 0.0f;
    } else {
      for (long k = k0; k < k1; ++k) dst[k * TT + t] = 0.0f;
    }
  }
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
        // indices come 8 to a 64-bit load and are unpacked with shifts (ALU ports), which
        // takes one load per pick off the load ports (the limit of this loop)
        const int q = j * NM_R + r;
        uint64_t word;
        std::memcpy(&word, ic + (q / 8) * 8, 8);
        const float* xp = xc + (long)((word >> (8 * (q % 8))) & 0xFF) * TT;
        // Opaque to the compiler, so the FMAs address [xp + disp] rather than [xc + offset +
        // disp]: with that indexed form this loop ran 1.04-1.2x slower at 2 threads (measured).
        asm("" : "+r"(xp));
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
  // Epilogue: bias and activation, vectorised over tokens; then a transposing copy into
  // y[t][row] (one scalar load and store per element, far cheaper than lane extraction).
  alignas(64) float zb[NM_R][V * NM_VL];
#pragma GCC unroll 16
  for (int r = 0; r < NM_R; ++r) {
    const int row = rt * NM_R + r;
    const float bv = (NM_HAS_BIAS && row < NM_OUT) ? bias[row] : 0.0f;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) vstore(&zb[r][v * NM_VL], activate(acc[r][v] + bv));
  }
  // Written straight into y[t][row] (y: row 0 of this tile, token t0).
  const long tn = (T - t0 < V * NM_VL) ? T - t0 : V * NM_VL;
  const int rows = (rt * NM_R + NM_R <= NM_OUT) ? NM_R : NM_OUT - rt * NM_R;
#if NM_AVX512 && NM_R <= 8
  const unsigned mu = rows >= 4 ? 0xFu : (1u << rows) - 1u;
  const unsigned mw = rows <= 4 ? 0u : (1u << (rows - 4)) - 1u;
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) {
    if (v * NM_VL >= tn) break;
    __m512 a[8];
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) a[r] = r < NM_R ? _mm512_loadu_ps(&zb[r][v * NM_VL]) : _mm512_setzero_ps();
    store_transposed16(a, y + v * NM_VL * NM_OUT, tn - v * NM_VL, mu, mw);
  }
#else
  for (long t = 0; t < tn; ++t)
    for (int r = 0; r < rows; ++r) y[t * NM_OUT + r] = zb[r][t];
#endif
}

// Few tokens (decode): the weight is read once per call, so this path is bound by weight
// bandwidth. (chunk, pick, row) triples of a tile are the vector lanes; a pick is a permute of
// the chunk of x held in a register (AVX-512, m <= 32), a vector gather (AVX2, n * R <= 8), or
// a scalar gather otherwise.
#if NM_AVX512 && NM_N * NM_R <= 16 && NM_M <= 32 && !NM_PERM
// The permute path below beats a 16-token tile panel up to ~8 tokens on the tile layout
// (4 tokens: 2x, 8 tokens: 1.1-1.2x; 12-16 tokens: slower). The perm path covers small T itself.
static constexpr int SMALL_T = 8;
#else
static constexpr int SMALL_T = 3;
#endif

#if NM_AVX512 || NM_AVX2
// One token's lane accumulators a[g * NM_R + r] (g < groups) summed per row r, plus bias and
// activation, stored to the tile's `rows` outputs at yt.
static_assert(NM_R <= NM_VL, "a tile's rows fit one vector");
static inline void store_row_sums(const float* a, int groups, const float* __restrict bias,
                                  int rt, int rows, float* __restrict yt) {
  alignas(64) float z[NM_VL] = {};
  for (int r = 0; r < NM_R; ++r) {
    float sum = 0.0f;
    for (int g = 0; g < groups; ++g) sum += a[g * NM_R + r];
    z[r] = sum + ((NM_HAS_BIAS && r < rows) ? bias[rt * NM_R + r] : 0.0f);
  }
  vstore(z, activate(vload(z)));
  std::memcpy(yt, z, sizeof(float) * rows);
}
#endif

static void small_t(const float* __restrict x, long T, const float* __restrict vals,
                    const uint8_t* __restrict idx, const float* __restrict bias, float* __restrict y,
                    int rt0, int rt1) {
  for (int rt = rt0; rt < rt1; ++rt) {
    const float* w = vals + (long)rt * NM_C * NM_N * NM_R;
    const uint8_t* id = idx + (long)rt * NM_C * NM_N * NM_R;
    const int rows = (rt * NM_R + NM_R <= NM_OUT) ? NM_R : NM_OUT - rt * NM_R;
#if NM_AVX512 && NM_N * NM_R <= 16 && NM_M <= 32
    // Lanes = (chunk q < DG, pick j, row r): the DG * n * R values of DG consecutive chunks are
    // contiguous in the layout; the x window of DG * m <= 32 floats sits in two registers and
    // one two-source permute picks every lane's input. Lane groups are summed per row at the end.
    constexpr int NR = NM_N * NM_R;
    constexpr int DG = (16 / NR < 32 / NM_M) ? 16 / NR : 32 / NM_M;
    alignas(64) int32_t qo[16];
    for (int l = 0; l < 16; ++l) qo[l] = l < DG * NR ? (l / NR) * NM_M : 0;
    const __m512i qoff = _mm512_load_si512(qo);
    __m512 acc[SMALL_T];
    for (int t = 0; t < SMALL_T; ++t) acc[t] = _mm512_setzero_ps();
    for (int c = 0; c < NM_C; c += DG) {
      const int nc = NM_C - c < DG ? NM_C - c : DG;
      const long o = (long)c * NR;
      const __m512 wv = _mm512_maskz_loadu_ps((__mmask16)((1u << (nc * NR)) - 1u), w + o);
      const __m512i iv = _mm512_add_epi32(
          _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(id + o))), qoff);
      const int kin0 = NM_K - c * NM_M, kin = kin0 < DG * NM_M ? kin0 : DG * NM_M;
      const __mmask16 mlo = (__mmask16)(kin >= 16 ? 0xFFFFu : (1u << kin) - 1u);
      const __mmask16 mhi = (__mmask16)(kin <= 16 ? 0u : (kin >= 32 ? 0xFFFFu : (1u << (kin - 16)) - 1u));
      for (int t = 0; t < SMALL_T && t < T; ++t) {
        const float* xw = x + t * NM_K + (long)c * NM_M;
        const __m512 lo = _mm512_maskz_loadu_ps(mlo, xw);
        const __m512 hi = _mm512_maskz_loadu_ps(mhi, xw + 16);
        acc[t] = _mm512_fmadd_ps(wv, _mm512_permutex2var_ps(lo, iv, hi), acc[t]);
      }
    }
    for (int t = 0; t < SMALL_T && t < T; ++t) {
      alignas(64) float a[16];
      _mm512_store_ps(a, acc[t]);
      store_row_sums(a, DG * NM_N, bias, rt, rows, y + t * NM_OUT + rt * NM_R);
    }
#elif NM_AVX2 && NM_N * NM_R <= 8
    // Lanes = (chunk q < DG, pick j, row r), as the AVX-512 branch above: the DG * n * R values
    // of DG consecutive chunks are contiguous in the layout; x is gathered at each lane's
    // input position (lanes past the tile's chunks and picks in the k padding masked off).
    constexpr int NR = NM_N * NM_R;
    constexpr int DG = 8 / NR;
    alignas(32) int32_t qo[8], ln[8];
    for (int l = 0; l < 8; ++l) {
      qo[l] = l < DG * NR ? (l / NR) * NM_M : 0;
      ln[l] = l;
    }
    const __m256i qoff = _mm256_load_si256((const __m256i*)qo);
    const __m256i lane = _mm256_load_si256((const __m256i*)ln);
    const __m256i kmax = _mm256_set1_epi32(NM_K);
    __m256 acc[SMALL_T];
    for (int t = 0; t < SMALL_T; ++t) acc[t] = _mm256_setzero_ps();
    for (int c = 0; c < NM_C; c += DG) {
      const int nc = NM_C - c < DG ? NM_C - c : DG;
      const long o = (long)c * NR;
      const __m256i kv = _mm256_add_epi32(
          _mm256_add_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(id + o))), qoff),
          _mm256_set1_epi32(c * NM_M));
      const __m256 live = _mm256_castsi256_ps(_mm256_and_si256(
          _mm256_cmpgt_epi32(_mm256_set1_epi32(nc * NR), lane), _mm256_cmpgt_epi32(kmax, kv)));
      const __m256 wv = _mm256_and_ps(_mm256_loadu_ps(w + o), live);
      for (int t = 0; t < SMALL_T && t < T; ++t) {
        const __m256 g = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x + t * NM_K, kv, live, 4);
        acc[t] = _mm256_fmadd_ps(wv, g, acc[t]);
      }
    }
    for (int t = 0; t < SMALL_T && t < T; ++t) {
      alignas(32) float a[8];
      _mm256_store_ps(a, acc[t]);
      store_row_sums(a, DG * NM_N, bias, rt, rows, y + t * NM_OUT + rt * NM_R);
    }
#else
    for (long t = 0; t < T; ++t) {
      const float* xt = x + t * NM_K;
      float acc[NM_R] = {};
      for (int c = 0; c < NM_C; ++c) {
        const float* xc = xt + (long)c * NM_M;
        const long o = (long)c * NM_N * NM_R;
        for (int j = 0; j < NM_N; ++j)
          for (int r = 0; r < NM_R; ++r) {
            const int k = id[o + j * NM_R + r];
            // picks in the k padding have zero weight; skip them rather than read past x
            if (c * NM_M + k < NM_K) acc[r] += w[o + j * NM_R + r] * xc[k];
          }
      }
      alignas(64) float z[NM_VL];
      for (int r = 0; r < rows; r += NM_VL) {
        vf a = splat(0.0f);
        for (int l = 0; l < NM_VL && r + l < rows; ++l)
          a[l] = acc[r + l] + (NM_HAS_BIAS ? bias[rt * NM_R + r + l] : 0.0f);
        vstore(z, activate(a));
        for (int l = 0; l < NM_VL && r + l < rows; ++l) y[t * NM_OUT + rt * NM_R + r + l] = z[l];
      }
    }
#endif
  }
}

typedef void (*tile_fn)(const float*, const float*, const uint8_t*, int, int, float*, bool, bool,
                        int, long, long, const float*, float*);

template <int V>
static void tile_entry(const float* xt, const float* w, const uint8_t* id, int c0, int c1,
                       float* yb, bool first, bool last, int rt, long t0, long T,
                       const float* bias, float* y) {
  tile<V>(xt, w, id, c0, c1, yb, first, last, rt, t0, T, bias, y);
}

template <int... I>
static constexpr std::array<tile_fn, sizeof...(I)> make_table(std::integer_sequence<int, I...>) {
  return {tile_entry<I + 1>...};
}

static tile_fn pick_tile(int v) {
  static constexpr auto table = make_table(std::make_integer_sequence<int, NM_TV>{});
  return table[(v < 1 ? 1 : v) - 1];
}


#if NM_PERM
// Defined in nm_perm.cpp, appended to this file when rendered.
static void perm_forward(const float* x, long T, const float* vals, const uint8_t* idx,
                         const float* bias, float* y, float* spill, int nthreads);
#endif

extern "C" {

int nm_abi_version(void) { return 3; }

long nm_xt_floats(long T) {
#if NM_PERM
  return 1;  // the perm path packs x into a per-thread stack buffer
#else
  return ((T + TT - 1) / TT) * KP * TT;
#endif
}

// Accumulator spill slots between k blocks, one per row tile (each tile belongs to one thread).
long nm_ybuf_floats(void) {
#if NM_PERM
  return NM_PKB >= NM_C ? 0 : (long)NT * NM_PTB * 16;
#endif
  return NM_KBC >= NM_C ? 0 : (long)NT * NM_R * TT;
}

// x: (T, NM_K) row-major; vals/idx: packed weight (both readable 16 elements past their end);
// bias: (NM_OUT) or null; y: (T, NM_OUT);
// xt: nm_xt_floats(T) floats of scratch; ybuf: nm_ybuf_floats() floats of scratch.
int nm_forward(const float* x, long T, const float* vals, const uint8_t* idx, const float* bias,
               float* y, float* xt, float* ybuf, int nthreads) {
  if (T <= 0) return 0;
  static_assert(NM_TV >= 1 && NM_TV <= 8, "NM_TV must be in 1..8");
  const long panels = (T + TT - 1) / TT;
  const long kblocks = (KP + 63) / 64;
  if (nthreads < 1) nthreads = 1;
  if (T <= SMALL_T) {
#pragma omp parallel num_threads(nthreads)
    {
      const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
      small_t(x, T, vals, idx, bias, y, (int)((long)NT * tid / nth),
              (int)((long)NT * (tid + 1) / nth));
    }
    return 0;
  }
#if NM_PERM
  perm_forward(x, T, vals, idx, bias, y, ybuf, nthreads);
  return 0;
#endif
#pragma omp parallel num_threads(nthreads)
  {
    // 1. Transpose x into token panels (zero-padded in tokens and in k), the k blocks shared
    // out among the threads. 2. Threads split the row tiles and each runs every panel over its
    // own tiles, so each reads only its share of the weights (from L3 when a previous layer
    // has evicted them); with the panels split instead every thread read all the weights
    // (docs/nm_cpu.md, "Threads").
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    for (long p = 0; p < panels; ++p)
      for (long b = tid; b < kblocks; b += nth) {
        const long k0 = b * 64, k1 = k0 + 64 < KP ? k0 + 64 : KP;
        transpose_x(x, T, p * TT, k0, k1, xt + p * KP * TT);
      }
#pragma omp barrier
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
          if (rt + 1 < rt1) {  // the next tile's weights start a new page: fetch them early
            const long nx = off + (long)NM_C * NM_N * NM_R + (long)c0 * NM_N * NM_R;
            const long nb = (long)(c1 - c0) * NM_N * NM_R;
            for (long b = 0; b < nb * 4; b += 64) __builtin_prefetch((const char*)(vals + nx) + b);
            for (long b = 0; b < nb; b += 64) __builtin_prefetch(idx + nx + b);
          }
          float* yb = ybuf ? ybuf + (long)rt * NM_R * TT : nullptr;
          const bool last = c1 == NM_C;
          fn(xp, vals + off, idx + off, c0, c1, yb, c0 == 0, last, rt, t0, T, bias,
             y + t0 * NM_OUT + rt * NM_R);
        }
      }
    }
  }
  return 0;
}

}  // extern "C"
