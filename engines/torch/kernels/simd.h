// AVX-512 helpers shared by the CPU kernels: float32 loads of 16 elements of any kernel dtype,
// a vectorized exp, and the online softmax's base-2 exp and rescaling step.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const c10::BFloat16* p) {  // bfloat16 is float32's top half
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
static inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// exp(x) of 16 floats: x = n ln2 + r, |r| <= ln2/2, exp(r) by Cephes' expf polynomial (about
// 1 ulp), times 2^n; inputs below -87.3 are taken as -87.3 (exp ~1e-38: a softmax weight of
// nothing; the inputs here are scores less their maximum, <= 0).
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
// The online softmax of the attention kernels (AMX and AVX512-BF16), base 2.
namespace softmax {

// How far (base 2) a row's maximum may outgrow the softmax's reference maximum before the output
// is rescaled (FlashAttention-4's conditional rescaling): weights stay <= 2^RESCALE.
constexpr float RESCALE = 8.f;

// 2^x of 16 floats, x = n + f, |f| <= 1/2: 2^f by its Taylor polynomial of degree 4 (relative
// error <= 4e-5, a hundredth of bfloat16's rounding, which the weights take next), times 2^n.
static inline __m512 exp2_16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(9.6181291e-3f), f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// The online softmax's step for 16 lanes (query rows or heads): m is the reference maximum (base
// 2), cmax this chunk's maximum. The reference moves only when some lane's maximum outgrows it by
// more than RESCALE, or on the first chunk (m = -inf); then alpha is what the running output and
// sum are multiplied by, and the result is true.
static inline bool advance(__m512& m, __m512 cmax, __m512& alpha) {
  if (!_mm512_cmplt_ps_mask(_mm512_add_ps(m, _mm512_set1_ps(RESCALE)), cmax)) return false;
  const __m512 mnew = _mm512_max_ps(m, cmax);
  alpha = exp2_16(_mm512_max_ps(_mm512_sub_ps(m, mnew), _mm512_set1_ps(-126.f)));  // m = -inf: 2^-126
  m = mnew;
  return true;
}

}  // namespace softmax

// Asks for the cache lines of one token's K (or V) row ahead of its use (HINT: _MM_HINT_T0 into
// L1, _MM_HINT_T1 into L2).
template <int HINT = _MM_HINT_T0, typename T>
static inline void prefetch_row(const T* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + b, static_cast<_mm_hint>(HINT));
}
#endif
