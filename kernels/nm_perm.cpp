// SparTA-py: the permute path of the n:m sparse linear layer (AVX-512).
//
// Appended to nm_linear.cpp by sparta.codegen.nm_cpu (one translation unit): it uses that
// file's helpers and constants, and nm_forward there calls perm_forward.
#if NM_PERM
// Permute path (AVX-512, n * R == 16, m <= 32): the 16 lanes of a vector are the (pick j, row r)
// of one chunk of one row tile, exactly as the packed layout stores them, so a weight vector is
// one load. Per token the chunk's m inputs sit in a register (one load from a packed copy of x)
// and one permute by the pick indices lines them up with the weights: one permute + one FMA per
// 16 kept weights, at any sparsity, and no transposes. Accumulators: one per token of a block
// of NM_PTB tokens, so each weight vector serves NM_PTB FMAs; the n partial sums of a row are
// folded at the end and the R outputs of a token are one masked store into y.
static constexpr int PL = 16;  // lanes
static_assert(NM_N * NM_R == PL, "permute path needs n * R == 16");
static_assert(NM_M <= 32, "permute path needs m <= 32");
// floats per chunk in the packed copy of x (NM_PS: m, or m rounded up to 4, 8, 16 or 32 so that
// windows are aligned and never straddle a cache line)
static constexpr int PS = NM_PS;
static_assert(PS >= NM_M && PS <= 32, "NM_PS");
// token stride of the packed copy of x (one k block of a token block); +16 floats skew the
// tokens over the L1 sets
static constexpr long PXS = (long)NM_PKB * PS + 16;

// The window of one chunk (lanes >= m are don't-cares: indices are < m). Unaligned slots
// (PS == m, not 4/8/16) read up to 16 floats past the chunk, inside the scratch's slack.
static inline __m512 window(const float* p) {
  if (PS == 4) return _mm512_castps128_ps512(_mm_load_ps(p));
  if (PS == 8) return _mm512_castps256_ps512(_mm256_load_ps(p));
  if (PS == 16) return _mm512_load_ps(p);
  return _mm512_loadu_ps(p);
}

template <int TB>
static inline void perm_tile(const float* __restrict xs, const float* __restrict w,
                             const uint8_t* __restrict id, int c0, int c1, float* __restrict sp,
                             bool first, bool last, int rt, const float* __restrict bias,
                             float* __restrict y) {
  __m512 acc[TB];
  if (first) {
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t) acc[t] = _mm512_setzero_ps();
  } else {
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t) acc[t] = _mm512_load_ps(sp + t * PL);
  }
  const float* wc = w + (long)c0 * PL;
  const uint8_t* ic = id + (long)c0 * PL;
  // xs: chunk c0 of the block's first token
  for (int c = 0; c < c1 - c0; ++c) {
    const __m512 wv = _mm512_loadu_ps(wc + c * PL);
    const __m512i iv = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(ic + c * PL)));
    const float* xw = xs + (long)c * PS;
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t) {
      __m512 xv;
      if (PS > 16)
        xv = _mm512_permutex2var_ps(_mm512_loadu_ps(xw + t * PXS), iv,
                                    _mm512_loadu_ps(xw + t * PXS + 16));
      else
        xv = _mm512_permutexvar_ps(iv, window(xw + t * PXS));
      acc[t] = _mm512_fmadd_ps(wv, xv, acc[t]);
    }
  }
  if (!last) {
#pragma GCC unroll 16
    for (int t = 0; t < TB; ++t) _mm512_store_ps(sp + t * PL, acc[t]);
    return;
  }
  const int rows = (rt * NM_R + NM_R <= NM_OUT) ? NM_R : NM_OUT - rt * NM_R;
  const __mmask16 mr = (__mmask16)((1u << rows) - 1u);
  const __m512 bv = NM_HAS_BIAS ? _mm512_maskz_loadu_ps(mr, bias + rt * NM_R) : _mm512_setzero_ps();
  // lanes j * R + r: fold the n partial sums of row r into lane r
  alignas(64) int32_t sh[NM_N][16];
  for (int g = 0; g < NM_N; ++g)
    for (int l = 0; l < 16; ++l) sh[g][l] = (l + g * NM_R) & 15;
#pragma GCC unroll 16
  for (int t = 0; t < TB; ++t) {
    __m512 s = acc[t];
#pragma GCC unroll 16
    for (int g = 1; g < NM_N; ++g)
      s = _mm512_add_ps(s, _mm512_permutexvar_ps(_mm512_load_si512(sh[g]), acc[t]));
    const vf z = activate((vf)_mm512_add_ps(s, bv));
    _mm512_mask_storeu_ps(y + t * NM_OUT, mr, (__m512)z);
  }
}

typedef void (*perm_fn)(const float*, const float*, const uint8_t*, int, int, float*, bool, bool,
                        int, const float*, float*);
template <int TB>
static void perm_entry(const float* xs, const float* w, const uint8_t* id, int c0, int c1,
                       float* sp, bool first, bool last, int rt, const float* bias, float* y) {
  perm_tile<TB>(xs, w, id, c0, c1, sp, first, last, rt, bias, y);
}
template <int... I>
static constexpr std::array<perm_fn, sizeof...(I)> make_ptable(std::integer_sequence<int, I...>) {
  return {perm_entry<I + 1>...};
}
static perm_fn pick_perm(int tb) {
  static constexpr auto table = make_ptable(std::make_integer_sequence<int, NM_PTB>{});
  return table[(tb < 1 ? 1 : tb) - 1];
}

// x rows [t0, t0 + tb), chunks [c0, c1) -> xs[t][c - c0][0..PS), zero past K and past m.
static inline void pack_x(const float* __restrict x, long t0, int tb, int c0, int c1,
                          float* __restrict xs) {
  for (int t = 0; t < tb; ++t) {
    const float* src = x + (t0 + t) * NM_K;
    float* dst = xs + t * PXS;
    if (PS == NM_M) {  // a piece of x's row, zero-padded past K
      const long k0 = (long)c0 * NM_M, k1 = (long)c1 * NM_M, kv = k1 < NM_K ? k1 : NM_K;
      std::memcpy(dst, src + k0, sizeof(float) * (kv - k0));
      for (long k = kv; k < k1; ++k) dst[k - k0] = 0.0f;
      continue;
    }
    for (int c = c0; c < c1; ++c) {
      const long k = (long)c * NM_M;
      const long kin = NM_K - k < NM_M ? NM_K - k : NM_M;
      if (PS <= 16) {
        const __mmask16 mk = (__mmask16)((1u << kin) - 1u);
        const __m512 v = _mm512_maskz_loadu_ps(mk, src + k);
        if (PS == 4) _mm_store_ps(dst, _mm512_castps512_ps128(v));
        else if (PS == 8) _mm256_store_ps(dst, _mm512_castps512_ps256(v));
        else _mm512_store_ps(dst, v);
      } else {
        const __mmask16 ml = (__mmask16)(kin >= 16 ? 0xFFFFu : (1u << kin) - 1u);
        const __mmask16 mh = (__mmask16)(kin <= 16 ? 0u : (1u << (kin - 16)) - 1u);
        _mm512_store_ps(dst, _mm512_maskz_loadu_ps(ml, src + k));
        _mm512_store_ps(dst + 16, _mm512_maskz_loadu_ps(mh, src + k + 16));
      }
      dst += PS;
    }
  }
}

static void perm_forward(const float* x, long T, const float* vals, const uint8_t* idx,
                         const float* bias, float* y, float* spill, int nthreads) {
  // Row tiles per group: the group's weights (~NM_PGB bytes) stay in L2 while every token
  // block passes over them; within a token block, k blocks of NM_PKB chunks keep the block's
  // slice of x in L1 while the group's row tiles read it.
  constexpr long TILE_BYTES = (long)NM_C * PL * 5;
  constexpr int GT = NM_PGB / TILE_BYTES < 1 ? 1 : (int)(NM_PGB / TILE_BYTES);
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    // Threads split the row tiles; each packs the (token block x k block) slices of x it reads
    // into its own L1-sized buffer (x is read once per group of row tiles).
    alignas(64) float xs[NM_PTB * PXS + 32];
    const int rt0 = (int)((long)NT * tid / nth), rt1 = (int)((long)NT * (tid + 1) / nth);
    for (int g0 = rt0; g0 < rt1; g0 += GT) {
      const int g1 = g0 + GT < rt1 ? g0 + GT : rt1;
      for (long t0 = 0; t0 < T; t0 += NM_PTB) {
        const int tb = (int)(T - t0 < NM_PTB ? T - t0 : NM_PTB);
        const perm_fn fn = pick_perm(tb);
        for (int c0 = 0; c0 < NM_C; c0 += NM_PKB) {
          const int c1 = c0 + NM_PKB < NM_C ? c0 + NM_PKB : NM_C;
          pack_x(x, t0, tb, c0, c1, xs);
          for (int rt = g0; rt < g1; ++rt) {
            const long off = (long)rt * NM_C * PL;
            if (rt + 1 < g1) {  // the next tile's block of weights: fetch it early
              const long nx = off + (long)NM_C * PL + (long)c0 * PL;
              const long nb = (long)(c1 - c0) * PL;
              for (long b = 0; b < nb * 4; b += 64) __builtin_prefetch((const char*)(vals + nx) + b);
              for (long b = 0; b < nb; b += 64) __builtin_prefetch(idx + nx + b);
            }
            fn(xs, vals + off, idx + off, c0, c1,
               spill + (long)rt * NM_PTB * PL, c0 == 0, c1 == NM_C, rt, bias,
               y + t0 * NM_OUT + rt * NM_R);
          }
        }
      }
    }
  }
}
#endif
