// Fused selective scan on CPU with mamba-ssm's semantics:
//   dt = softplus(delta + delta_bias) (or delta + delta_bias), h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,
//   y_t = C_t . h_t + D u_t, out_t = y_t * silu(z_t).
//
// Vectorised across channels: one SIMD vector holds W consecutive channels (W = 16 fp32 with AVX-512, 8 with AVX2,
// 4 with SSE2/NEON), and each of the N states is one vector, so the state update, y = C . h, du and ddelta are plain
// vertical FMAs with B_t[n]/C_t[n] broadcast; no horizontal sums on the critical path. Only dB/dC (sums over
// channels) need horizontal sums: they accumulate per chunk in W-lane vectors over every channel block of a row and
// are reduced once per chunk.
//
// Layouts (scan_cpu.py makes them so without copies where the model's tensors already are):
//   u, delta, z, y, du, ddelta, dz: (B, L, D) time-major with unit channel stride (row strides free on inputs);
//   A (D, N); D, delta_bias (D); B, C: (B, G, L, N) with unit state stride; h0/last (B, D, N);
//   starts (B, nchunks, D / W, N, W): the state at the start of each chunk (the backward recomputes each chunk from it).
// Channels per group must be a multiple of W (scan_cpu.py pads them).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__SSE2__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__)
constexpr int kVecBytes = 32;
constexpr const char* kIsa = "avx2";
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr const char* kIsa = "avx";
#elif defined(__aarch64__)
constexpr int kVecBytes = 16;
constexpr const char* kIsa = "neon";
#else
constexpr int kVecBytes = 16;
constexpr const char* kIsa = "sse2";
#endif
// States kept in registers at once: 32 vector registers with AVX-512, 16 otherwise.
constexpr int kFwdGroup = kVecBytes == 64 ? 16 : 8;
constexpr int kBwdGroup = kVecBytes == 64 ? 8 : 4;
#if defined(__FP_FAST_FMAF) || defined(__FMA__) || defined(__aarch64__)
constexpr bool kFma = true;
#else
constexpr bool kFma = false;
#endif

typedef float vf __attribute__((vector_size(kVecBytes)));
typedef int32_t vi32 __attribute__((vector_size(kVecBytes)));
typedef double vd __attribute__((vector_size(kVecBytes)));

template <typename T> struct VecOf;
template <> struct VecOf<float> { typedef vf type; };
template <> struct VecOf<double> { typedef vd type; };
template <typename T> using Vec = typename VecOf<T>::type;
template <typename T> constexpr int lanes() { return kVecBytes / static_cast<int>(sizeof(T)); }

template <typename V, typename T> inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T> inline void vstore(T* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }
template <typename V, typename T> inline V splat(T s) {
  V v = {};
  return v + s;
}
template <typename V> inline V vmin(V a, V b) { return a < b ? a : b; }
template <typename V> inline V vmax(V a, V b) { return a > b ? a : b; }
// One min/max instruction instead of compare + blend (GCC keeps the blend for NaN ordering; a NaN stays NaN here).
#if defined(__AVX512F__)
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
#elif defined(__AVX__)
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
#elif defined(__SSE2__)
inline vf vmin(vf a, vf b) { return _mm_min_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm_max_ps(a, b); }
#endif
template <typename T> inline T hsum(const Vec<T>& v) {
  T s = 0;
  for (int i = 0; i < lanes<T>(); ++i) s += v[i];
  return s;
}

// exp(x) for fp32 lanes: x = k ln2 + r with |r| <= ln2/2, exp(r) by a degree-7 polynomial (Cephes' expf
// coefficients), 2^k built in the exponent bits. ~2 ulp; x is clamped to [-87, 88] (exp(-87) ~ 2e-38 stands in for
// anything smaller, the normal-float range).
#if defined(__AVX512F__)
// AVX-512: round with vrndscaleps and scale by 2^k with vscalefps (15 instructions instead of 22).
inline vf vexp(vf xv) {
  __m512 x = _mm512_max_ps(xv, _mm512_set1_ps(-87.0f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, k);
}
#else
inline vf vexp(vf x) {
  x = vmax(x, splat<vf>(-87.0f));
  x = vmin(x, splat<vf>(88.0f));
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const vf k = (x * 1.44269504088896341f + magic) - magic;
  vf r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  vf p = splat<vf>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi32 bits = (__builtin_convertvector(k, vi32) + 127) << 23;
  return p * (vf)bits;
}
#endif

// log1p(e) for e >= 0 in fp32 lanes: Cephes' logf on u = 1 + e, plus the rounding correction (e - (u - 1)) / u.
inline vf vlog1p_nonneg(vf e) {
  const vf u = e + 1.0f;
  const vi32 ubits = (vi32)u;
  vi32 ex = (ubits >> 23) - 126;
  const vi32 mbits = (ubits & 0x007fffff) | 0x3f000000;
  vf m = (vf)mbits;  // u = m 2^ex, m in [0.5, 1)
  const vi32 small = m < splat<vf>(0.70710678118654752f);
  ex = ex + small;  // small is -1 where true
  m = (small ? m + m : m) - 1.0f;
  const vf z = m * m;
  vf y = splat<vf>(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const vf ef = __builtin_convertvector(ex, vf);
  y = y + ef * -2.12194440e-4f;
  y = y - z * 0.5f;
  vf r = m + y;
  r = r + ef * 0.693359375f;
  return r + (e - (u - 1.0f)) / u;
}

// fp64 runs are for checks: libm per lane.
inline vd vexp(vd x) {
  vd r;
  for (int i = 0; i < lanes<double>(); ++i) r[i] = std::exp(x[i]);
  return r;
}
inline vd vlog1p_nonneg(vd e) {
  vd r;
  for (int i = 0; i < lanes<double>(); ++i) r[i] = std::log1p(e[i]);
  return r;
}

// softplus with torch's threshold (x > 20 -> x) and its derivative, sigmoid(x) (1 above the threshold).
template <typename V> inline void softplus_fwd(V x, V& sp, V& dsp) {
  using T = std::remove_reference_t<decltype(x[0])>;
  const V thr = splat<V>(T(20));
  const V e = vexp(vmin(x, thr));
  sp = x > thr ? x : vlog1p_nonneg(e);
  dsp = x > thr ? splat<V>(T(1)) : e / (e + T(1));
}

template <typename T> struct Args {
  const T *u, *delta, *A, *Bm, *Cm, *Dv, *z, *bias, *h0;
  int64_t batch, length, dim, dstate, groups, chunk;
  int64_t su_b, su_t, sd_b, sd_t, sz_b, sz_t;  // (B, L, D) inputs
  int64_t sB_b, sB_g, sB_t, sC_b, sC_g, sC_t;  // (B, G, L, N) inputs
  bool softplus;
  int64_t nchunks() const { return (length + chunk - 1) / chunk; }
};

// Runs f(integral_constant<NG>, n0) over [n0, N) in register groups of NG states (NGmax, then halves for a tail).
template <int NGmax, typename F> inline void for_groups(int64_t N, int64_t n0, F&& f) {
  for (; n0 + NGmax <= N; n0 += NGmax) f(std::integral_constant<int, NGmax>{}, n0);
  if constexpr (NGmax > 1) {
    if (n0 < N) for_groups<NGmax / 2>(N, n0, f);
  }
}

// Per-step inputs of one chunk for one channel block: dt (after bias/softplus), its softplus derivative, x = dt u.
template <typename T>
inline void chunk_steps(const Args<T>& a, int64_t b, int64_t d0, int64_t t0, int64_t steps, const Vec<T>& biasv,
                        Vec<T>* dtb, Vec<T>* dspb, Vec<T>* xb) {
  using V = Vec<T>;
  for (int64_t i = 0; i < steps; ++i) {
    const int64_t t = t0 + i;
    V dr = vload<V>(a.delta + b * a.sd_b + t * a.sd_t + d0);
    if (a.bias) dr = dr + biasv;
    V dt = dr, dsp = splat<V>(T(1));
    if (a.softplus) softplus_fwd(dr, dt, dsp);
    dtb[i] = dt;
    if (dspb) dspb[i] = dsp;
    xb[i] = dt * vload<V>(a.u + b * a.su_b + t * a.su_t + d0);
  }
}

// Prefetch (into L2) the next channel block's rows while this block computes: rows of a time-major tensor are a
// whole (B, L, D) row apart, so the hardware prefetchers do not follow them. One row per stream per step, spread
// over the compute loop (prefetching a whole chunk at once fills the line-fill buffers and stalls).
struct Prefetch {
  const char* ptr[8];
  int64_t stride[8];  // bytes
  int nread = 0, n = 0;
  int64_t rows = 0;
  template <typename T> void add(const T* base, int64_t s_b, int64_t s_t, int64_t b, int64_t t0, int64_t d0, bool write) {
    if (!base) return;
    ptr[n] = reinterpret_cast<const char*>(base + b * s_b + t0 * s_t + d0);
    stride[n] = s_t * static_cast<int64_t>(sizeof(T));
    if (!write) {  // reads first
      std::swap(ptr[n], ptr[nread]);
      std::swap(stride[n], stride[nread]);
      ++nread;
    }
    ++n;
  }
  inline void row(int64_t i) const {
    if (i >= rows) return;
    for (int s = 0; s < nread; ++s) __builtin_prefetch(ptr[s] + i * stride[s], 0, 2);
    for (int s = nread; s < n; ++s) __builtin_prefetch(ptr[s] + i * stride[s], 1, 2);
  }
};

// One chunk's states for NG states [n0, n0 + NG): h carried in registers through hs; optionally every state and
// decay stored (backward recompute) and C . h accumulated into yb.
template <typename T, int NG, bool Store, bool WithY>
inline void scan_group(int64_t steps, int64_t n0, int64_t N, const Vec<T>* __restrict__ Av, Vec<T>* __restrict__ hs,
                       const Vec<T>* __restrict__ dtb, const Vec<T>* __restrict__ xb, Vec<T>* __restrict__ yb,
                       Vec<T>* __restrict__ hb, Vec<T>* __restrict__ ab, const T* __restrict__ Bp, int64_t sBt,
                       const T* __restrict__ Cp, int64_t sCt, const Prefetch* pf) {
  using V = Vec<T>;
  V h[NG];
#pragma GCC unroll 16
  for (int q = 0; q < NG; ++q) h[q] = hs[n0 + q];
  for (int64_t i = 0; i < steps; ++i) {
    const V dt = dtb[i], x = xb[i];
    const T* Bn = Bp + i * sBt + n0;
    const T* Cn = Cp + i * sCt + n0;
    if (pf && n0 == 0) pf->row(i);
    V y0 = {}, y1 = {};
#pragma GCC unroll 16
    for (int q = 0; q < NG; ++q) {
      const V a = vexp(dt * Av[n0 + q]);
      h[q] = a * h[q] + x * Bn[q];
      if constexpr (Store) {
        hb[(i + 1) * N + n0 + q] = h[q];
        ab[i * N + n0 + q] = a;
      }
      if constexpr (WithY) {
        if (q & 1) y1 += h[q] * Cn[q];
        else y0 += h[q] * Cn[q];
      }
    }
    if constexpr (WithY) yb[i] += y0 + y1;
  }
#pragma GCC unroll 16
  for (int q = 0; q < NG; ++q) hs[n0 + q] = h[q];
}

// Rows (batch) per task, split into parts of whole channel blocks when there are fewer rows than threads.
inline int64_t split_parts(int64_t rows, int64_t blocks) {
  const int64_t threads = at::get_num_threads();
  return rows >= threads ? 1 : std::max<int64_t>(1, std::min<int64_t>(blocks, (threads + rows - 1) / rows));
}

// starts: (B, nchunks, D / W, N, W), one block's chunk-start state contiguous.
template <typename T>
inline int64_t start_offset(int64_t b, int64_t k, int64_t d0, int64_t nch, int64_t D, int64_t N) {
  return (b * nch + k) * D * N + d0 * N;  // == ((b * nch + k) * (D / W) + d0 / W) * N * W
}

template <typename T>
void scan_forward(const Args<T>& a, T* y, T* last, T* starts) {
  using V = Vec<T>;
  constexpr int W = lanes<T>();
  const int64_t L = a.length, D = a.dim, N = a.dstate, G = a.groups, TC = a.chunk, nch = a.nchunks();
  const int64_t hdim = D / G, nblk = D / W;
  const int64_t parts = split_parts(a.batch, nblk), max_blk = (nblk + parts - 1) / parts;
  at::parallel_for(0, a.batch * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<V> Avs(max_blk * N), hs(max_blk * N), dtb(TC), xb(TC), yb(TC);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / parts, p = task % parts;
      const int64_t j0 = nblk * p / parts, nb = nblk * (p + 1) / parts - j0;
      for (int64_t jj = 0; jj < nb; ++jj) {
        const int64_t d0 = (j0 + jj) * W;
        for (int64_t n = 0; n < N; ++n)
          for (int l = 0; l < W; ++l) {
            Avs[jj * N + n][l] = a.A[(d0 + l) * N + n];
            hs[jj * N + n][l] = a.h0 ? a.h0[(b * D + d0 + l) * N + n] : T(0);
          }
      }
      // Chunk-major over the row's blocks: a chunk's rows stay in cache while every block of the row uses them.
      for (int64_t k = 0; k < nch; ++k) {
        const int64_t t0 = k * TC, steps = std::min(TC, L - t0);
        for (int64_t jj = 0; jj < nb; ++jj) {
          const int64_t d0 = (j0 + jj) * W, g = d0 / hdim;
          Prefetch pf;
          {
            const bool more = jj + 1 < nb;
            const int64_t kn = more ? k : k + 1, tn = kn * TC, dn = more ? d0 + W : j0 * W;
            if (kn < nch) {
              pf.rows = std::min(TC, L - tn);
              pf.add(a.delta, a.sd_b, a.sd_t, b, tn, dn, false);
              pf.add(a.u, a.su_b, a.su_t, b, tn, dn, false);
              pf.add(a.z, a.sz_b, a.sz_t, b, tn, dn, false);
              pf.add(static_cast<const T*>(y), L * D, D, b, tn, dn, true);
            }
          }
          V* h = hs.data() + jj * N;
          T* st = starts + start_offset<T>(b, k, d0, nch, D, N);
          for (int64_t n = 0; n < N; ++n) vstore(st + n * W, h[n]);
          const V Dv = a.Dv ? vload<V>(a.Dv + d0) : V{};
          const V biasv = a.bias ? vload<V>(a.bias + d0) : V{};
          chunk_steps(a, b, d0, t0, steps, biasv, dtb.data(), static_cast<V*>(nullptr), xb.data());
          std::fill(yb.begin(), yb.begin() + steps, V{});
          const T* Bp = a.Bm + b * a.sB_b + g * a.sB_g + t0 * a.sB_t;
          const T* Cp = a.Cm + b * a.sC_b + g * a.sC_g + t0 * a.sC_t;
          for_groups<kFwdGroup>(N, 0, [&](auto ng, int64_t n0) {
            scan_group<T, decltype(ng)::value, false, true>(steps, n0, N, Avs.data() + jj * N, h, dtb.data(),
                                                            xb.data(), yb.data(), nullptr, nullptr, Bp, a.sB_t, Cp,
                                                            a.sC_t, &pf);
          });
          for (int64_t i = 0; i < steps; ++i) {
            const int64_t t = t0 + i;
            V out = yb[i];
            if (a.Dv) out += Dv * vload<V>(a.u + b * a.su_b + t * a.su_t + d0);
            if (a.z) {
              const V zz = vload<V>(a.z + b * a.sz_b + t * a.sz_t + d0);
              out = out * (zz / (vexp(-zz) + T(1)));
            }
            vstore(y + (b * L + t) * D + d0, out);
          }
        }
      }
      for (int64_t jj = 0; jj < nb; ++jj)
        for (int64_t n = 0; n < N; ++n)
          for (int l = 0; l < W; ++l) last[(b * D + (j0 + jj) * W + l) * N + n] = hs[jj * N + n][l];
    }
  });
}

// Reverse sweep of one chunk for states [n0, n0 + NG): dh and dA in registers, dB/dC contributions added to the
// chunk's per-lane accumulators, the per-step sums over states (for du and ddelta) added to sdb/sdc.
template <typename T, int NG>
inline void adjoint_group(int64_t steps, int64_t n0, int64_t N, Vec<T>* __restrict__ carry, Vec<T>* __restrict__ dAacc,
                          const Vec<T>* __restrict__ Av, const Vec<T>* __restrict__ hb, const Vec<T>* __restrict__ ab,
                          const Vec<T>* __restrict__ dtb, const Vec<T>* __restrict__ xb,
                          const Vec<T>* __restrict__ gyb, Vec<T>* __restrict__ sdb, Vec<T>* __restrict__ sdc,
                          Vec<T>* __restrict__ Bacc, Vec<T>* __restrict__ Cacc, const T* __restrict__ Bp,
                          int64_t sBt, const T* __restrict__ Cp, int64_t sCt) {
  using V = Vec<T>;
  V dh[NG], dA[NG];
#pragma GCC unroll 16
  for (int q = 0; q < NG; ++q) {
    dh[q] = carry[n0 + q];
    dA[q] = dAacc[n0 + q];
  }
  for (int64_t i = steps - 1; i >= 0; --i) {
    const V gy = gyb[i], x = xb[i], dt = dtb[i];
    const T* Bn = Bp + i * sBt + n0;
    const T* Cn = Cp + i * sCt + n0;
    const V* hn = hb + (i + 1) * N + n0;
    const V* hp = hb + i * N + n0;
    const V* an = ab + i * N + n0;
    V* bacc = Bacc + i * N + n0;
    V* cacc = Cacc + i * N + n0;
    V s0 = {}, s1 = {}, c0 = {}, c1 = {};
#pragma GCC unroll 16
    for (int q = 0; q < NG; ++q) {
      cacc[q] += gy * hn[q];
      dh[q] += gy * Cn[q];  // now dL/dh_t
      bacc[q] += dh[q] * x;
      const V dha = dh[q] * an[q];
      const V sv = dha * hp[q];  // dL/d(dt_t A_n)
      dA[q] += sv * dt;
      if (q & 1) {
        s1 += dh[q] * Bn[q];
        c1 += sv * Av[n0 + q];
      } else {
        s0 += dh[q] * Bn[q];
        c0 += sv * Av[n0 + q];
      }
      dh[q] = dha;  // dL/dh_{t-1} through the decay
    }
    sdb[i] += s0 + s1;
    sdc[i] += c0 + c1;
  }
#pragma GCC unroll 16
  for (int q = 0; q < NG; ++q) {
    carry[n0 + q] = dh[q];
    dAacc[n0 + q] = dA[q];
  }
}

// Gradients of sum(dy * out) + sum(dlast * last). One task = one (batch, group) row, or a contiguous part of its
// channel blocks when there are fewer rows than threads (then dB/dC come per part and the caller sums the parts).
// dA/dD/dbias come per batch row ((B, N, D), (B, D), (B, D)); the caller sums over the batch.
template <typename T>
void scan_backward(const Args<T>& a, const T* starts, const T* dy, const T* dlast, T* du, T* ddelta, T* dz, T* dB,
                   T* dC, T* dA_p, T* dD_p, T* dbias_p, T* dh0, int64_t parts) {
  using V = Vec<T>;
  constexpr int W = lanes<T>();
  const int64_t L = a.length, D = a.dim, N = a.dstate, G = a.groups, TC = a.chunk, nch = a.nchunks();
  const int64_t hdim = D / G, gblk = hdim / W, rows = a.batch * G;
  const int64_t max_blk = (gblk + parts - 1) / parts;
  at::parallel_for(0, rows * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<V> carry(max_blk * N), dAacc(max_blk * N), Avs(max_blk * N), dDacc(max_blk), dbacc(max_blk);
    std::vector<V> hb((TC + 1) * N), ab(TC * N), dtb(TC), dspb(TC), xb(TC), yb(TC), gyb(TC), sdb(TC), sdc(TC);
    std::vector<V> Bacc(TC * N), Cacc(TC * N), hs(N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / parts, p = task % parts, b = r / G, g = r % G;
      const int64_t j0 = gblk * p / parts, nb = gblk * (p + 1) / parts - j0;
      for (int64_t jj = 0; jj < nb; ++jj) {
        const int64_t d0 = g * hdim + (j0 + jj) * W;
        for (int64_t n = 0; n < N; ++n)
          for (int l = 0; l < W; ++l) {
            Avs[jj * N + n][l] = a.A[(d0 + l) * N + n];
            carry[jj * N + n][l] = dlast ? dlast[(b * D + d0 + l) * N + n] : T(0);
          }
        std::fill(dAacc.begin() + jj * N, dAacc.begin() + (jj + 1) * N, V{});
        dDacc[jj] = V{};
        dbacc[jj] = V{};
      }
      const T* Brow = a.Bm + b * a.sB_b + g * a.sB_g;
      const T* Crow = a.Cm + b * a.sC_b + g * a.sC_g;
      T* dBr = dB + ((p * a.batch + b) * G + g) * L * N;
      T* dCr = dC + ((p * a.batch + b) * G + g) * L * N;
      for (int64_t k = nch - 1; k >= 0; --k) {
        const int64_t t0 = k * TC, steps = std::min(TC, L - t0);
        std::fill(Bacc.begin(), Bacc.begin() + steps * N, V{});
        std::fill(Cacc.begin(), Cacc.begin() + steps * N, V{});
        const T* Bp = Brow + t0 * a.sB_t;
        const T* Cp = Crow + t0 * a.sC_t;
        for (int64_t jj = 0; jj < nb; ++jj) {
          const int64_t d0 = g * hdim + (j0 + jj) * W;
          Prefetch pf;
          {
            const bool more = jj + 1 < nb;
            const int64_t kn = more ? k : k - 1, tn = kn * TC, dn = g * hdim + (more ? j0 + jj + 1 : j0) * W;
            if (kn >= 0) {
              pf.rows = std::min(TC, L - tn);
              pf.add(a.delta, a.sd_b, a.sd_t, b, tn, dn, false);
              pf.add(a.u, a.su_b, a.su_t, b, tn, dn, false);
              pf.add(a.z, a.sz_b, a.sz_t, b, tn, dn, false);
              pf.add(dy, L * D, D, b, tn, dn, false);
              pf.add(static_cast<const T*>(du), L * D, D, b, tn, dn, true);
              pf.add(static_cast<const T*>(ddelta), L * D, D, b, tn, dn, true);
              pf.add(static_cast<const T*>(dz), L * D, D, b, tn, dn, true);
            }
          }
          const V Dv = a.Dv ? vload<V>(a.Dv + d0) : V{};
          const V biasv = a.bias ? vload<V>(a.bias + d0) : V{};
          chunk_steps(a, b, d0, t0, steps, biasv, dtb.data(), dspb.data(), xb.data());
          // Recompute the chunk's states (and y, for the gate's gradient) from its start state.
          const T* st = starts + start_offset<T>(b, k, d0, nch, D, N);
          for (int64_t n = 0; n < N; ++n) hb[n] = vload<V>(st + n * W);
          std::copy(hb.begin(), hb.begin() + N, hs.begin());
          if (a.z) {
            std::fill(yb.begin(), yb.begin() + steps, V{});
            for_groups<kFwdGroup>(N, 0, [&](auto ng, int64_t n0) {
              scan_group<T, decltype(ng)::value, true, true>(steps, n0, N, Avs.data() + jj * N, hs.data(), dtb.data(),
                                                             xb.data(), yb.data(), hb.data(), ab.data(), Bp, a.sB_t,
                                                             Cp, a.sC_t, &pf);
            });
          } else {
            for_groups<kFwdGroup>(N, 0, [&](auto ng, int64_t n0) {
              scan_group<T, decltype(ng)::value, true, false>(steps, n0, N, Avs.data() + jj * N, hs.data(),
                                                              dtb.data(), xb.data(), nullptr, hb.data(), ab.data(), Bp,
                                                              a.sB_t, Cp, a.sC_t, &pf);
            });
          }
          // Output gate and D skip: dL/dy of the scan, dz, dD.
          for (int64_t i = 0; i < steps; ++i) {
            const int64_t t = t0 + i;
            const V dout = vload<V>(dy + (b * L + t) * D + d0);
            const V uu = vload<V>(a.u + b * a.su_b + t * a.su_t + d0);
            V gy = dout;
            if (a.z) {
              const V zz = vload<V>(a.z + b * a.sz_b + t * a.sz_t + d0);
              const V sig = T(1) / (vexp(-zz) + T(1));
              V yv = yb[i];
              if (a.Dv) yv += Dv * uu;
              gy = dout * (zz * sig);
              vstore(dz + (b * L + t) * D + d0, dout * yv * (sig * (zz * (T(1) - sig) + T(1))));
            }
            gyb[i] = gy;
            if (a.Dv) dDacc[jj] += gy * uu;
          }
          std::fill(sdb.begin(), sdb.begin() + steps, V{});
          std::fill(sdc.begin(), sdc.begin() + steps, V{});
          for_groups<kBwdGroup>(N, 0, [&](auto ng, int64_t n0) {
            adjoint_group<T, decltype(ng)::value>(steps, n0, N, carry.data() + jj * N, dAacc.data() + jj * N,
                                                  Avs.data() + jj * N, hb.data(), ab.data(), dtb.data(), xb.data(),
                                                  gyb.data(), sdb.data(), sdc.data(), Bacc.data(), Cacc.data(), Bp,
                                                  a.sB_t, Cp, a.sC_t);
          });
          for (int64_t i = 0; i < steps; ++i) {
            const int64_t t = t0 + i;
            const V uu = vload<V>(a.u + b * a.su_b + t * a.su_t + d0);
            V dut = sdb[i] * dtb[i];
            if (a.Dv) dut += gyb[i] * Dv;
            const V ddt = (sdb[i] * uu + sdc[i]) * dspb[i];
            dbacc[jj] += ddt;
            vstore(du + (b * L + t) * D + d0, dut);
            vstore(ddelta + (b * L + t) * D + d0, ddt);
          }
        }
        for (int64_t i = 0; i < steps; ++i)
          for (int64_t n = 0; n < N; ++n) {
            dBr[(t0 + i) * N + n] = hsum<T>(Bacc[i * N + n]);
            dCr[(t0 + i) * N + n] = hsum<T>(Cacc[i * N + n]);
          }
      }
      for (int64_t jj = 0; jj < nb; ++jj) {
        const int64_t d0 = g * hdim + (j0 + jj) * W;
        for (int64_t n = 0; n < N; ++n) vstore(dA_p + (b * N + n) * D + d0, dAacc[jj * N + n]);
        if (dD_p) vstore(dD_p + b * D + d0, dDacc[jj]);
        if (dbias_p) vstore(dbias_p + b * D + d0, dbacc[jj]);
        if (dh0)
          for (int64_t n = 0; n < N; ++n)
            for (int l = 0; l < W; ++l) dh0[(b * D + d0 + l) * N + n] = carry[jj * N + n][l];
      }
    }
  });
}

template <typename T>
Args<T> make_args(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A, const torch::Tensor& Bm,
                  const torch::Tensor& Cm, const c10::optional<torch::Tensor>& Dv,
                  const c10::optional<torch::Tensor>& z, const c10::optional<torch::Tensor>& bias,
                  const c10::optional<torch::Tensor>& h0, bool softplus, int64_t chunk) {
  Args<T> a;
  a.u = u.data_ptr<T>();
  a.delta = delta.data_ptr<T>();
  a.A = A.data_ptr<T>();
  a.Bm = Bm.data_ptr<T>();
  a.Cm = Cm.data_ptr<T>();
  a.Dv = Dv.has_value() ? Dv->data_ptr<T>() : nullptr;
  a.z = z.has_value() ? z->data_ptr<T>() : nullptr;
  a.bias = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  a.h0 = h0.has_value() ? h0->data_ptr<T>() : nullptr;
  a.batch = u.size(0);
  a.length = u.size(1);
  a.dim = u.size(2);
  a.dstate = A.size(1);
  a.groups = Bm.size(1);
  a.chunk = chunk;
  a.su_b = u.stride(0);
  a.su_t = u.stride(1);
  a.sd_b = delta.stride(0);
  a.sd_t = delta.stride(1);
  a.sz_b = z.has_value() ? z->stride(0) : 0;
  a.sz_t = z.has_value() ? z->stride(1) : 0;
  a.sB_b = Bm.stride(0);
  a.sB_g = Bm.stride(1);
  a.sB_t = Bm.stride(2);
  a.sC_b = Cm.stride(0);
  a.sC_g = Cm.stride(1);
  a.sC_t = Cm.stride(2);
  a.softplus = softplus;
  return a;
}

void check_inputs(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A, const torch::Tensor& Bm,
                  const torch::Tensor& Cm, const c10::optional<torch::Tensor>& Dv,
                  const c10::optional<torch::Tensor>& z, const c10::optional<torch::Tensor>& bias,
                  const c10::optional<torch::Tensor>& h0, int64_t chunk) {
  const auto st = u.scalar_type();
  TORCH_CHECK(st == torch::kFloat32 || st == torch::kFloat64, "selective_scan_cpu: fp32 or fp64 only");
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "u, delta: (B, L, D)");
  TORCH_CHECK(u.stride(2) == 1 && delta.stride(2) == 1, "u, delta: unit channel stride");
  TORCH_CHECK(Bm.dim() == 4 && Cm.sizes() == Bm.sizes() && (Bm.size(3) == 1 || (Bm.stride(3) == 1 && Cm.stride(3) == 1)),
              "B, C: (B, G, L, N) with unit state stride");
  const int64_t W = kVecBytes / static_cast<int64_t>(u.element_size());
  TORCH_CHECK(u.size(2) % (Bm.size(1) * W) == 0, "channels per group must be a multiple of ", W);
  TORCH_CHECK(A.is_contiguous() && A.size(0) == u.size(2) && A.size(1) == Bm.size(3), "A: (D, N) contiguous");
  TORCH_CHECK(chunk >= 1, "chunk >= 1");
  for (const auto* t : {&A, &Bm, &Cm, &delta}) TORCH_CHECK(t->scalar_type() == st, "inputs must share a dtype");
  for (const auto* t : {&Dv, &bias})
    if (t->has_value()) TORCH_CHECK((*t)->scalar_type() == st && (*t)->is_contiguous() && (*t)->numel() == u.size(2),
                                    "D, delta_bias: (D,) contiguous");
  if (z.has_value()) TORCH_CHECK(z->scalar_type() == st && z->sizes() == u.sizes() && z->stride(2) == 1, "z: like u");
  if (h0.has_value())
    TORCH_CHECK(h0->scalar_type() == st && h0->is_contiguous() && h0->size(0) == u.size(0) &&
                    h0->size(1) == u.size(2) && h0->size(2) == A.size(1),
                "h0: (B, D, N) contiguous");
}

std::vector<torch::Tensor> forward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bm,
                                   torch::Tensor Cm, c10::optional<torch::Tensor> Dv, c10::optional<torch::Tensor> z,
                                   c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> h0, bool softplus,
                                   int64_t chunk) {
  check_inputs(u, delta, A, Bm, Cm, Dv, z, bias, h0, chunk);
  const int64_t batch = u.size(0), length = u.size(1), dim = u.size(2), dstate = A.size(1);
  const int64_t nchunks = (length + chunk - 1) / chunk;
  auto y = torch::empty({batch, length, dim}, u.options());
  auto last = torch::empty({batch, dim, dstate}, u.options());
  auto starts = torch::empty({batch, nchunks, dim, dstate}, u.options());  // (B, nchunks, D / W, N, W)
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_forward", [&] {
    const auto a = make_args<scalar_t>(u, delta, A, Bm, Cm, Dv, z, bias, h0, softplus, chunk);
    scan_forward<scalar_t>(a, y.data_ptr<scalar_t>(), last.data_ptr<scalar_t>(), starts.data_ptr<scalar_t>());
  });
  return {y, last, starts};
}

// Returns du, ddelta, dA (B, N, D per batch row), dB, dC (parts, B, G, L, N), dD (B, D), dz, dbias (B, D), dh0;
// absent inputs give undefined tensors (None in Python).
std::vector<torch::Tensor> backward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bm,
                                    torch::Tensor Cm, c10::optional<torch::Tensor> Dv, c10::optional<torch::Tensor> z,
                                    c10::optional<torch::Tensor> bias, bool softplus, torch::Tensor starts,
                                    torch::Tensor dy, c10::optional<torch::Tensor> dlast, bool want_dh0,
                                    int64_t chunk) {
  check_inputs(u, delta, A, Bm, Cm, Dv, z, bias, c10::nullopt, chunk);
  TORCH_CHECK(dy.is_contiguous() && dy.sizes() == u.sizes() && dy.scalar_type() == u.scalar_type(), "dy: like u");
  if (dlast.has_value()) TORCH_CHECK(dlast->is_contiguous() && dlast->scalar_type() == u.scalar_type(), "dlast");
  const int64_t batch = u.size(0), length = u.size(1), dim = u.size(2), dstate = A.size(1), groups = Bm.size(1);
  const int64_t W = kVecBytes / static_cast<int64_t>(u.element_size());
  const int64_t rows = batch * groups, gblk = dim / groups / W;
  const int64_t parts = split_parts(rows, gblk);
  const auto opt = u.options();
  auto du = torch::empty({batch, length, dim}, opt);
  auto ddelta = torch::empty({batch, length, dim}, opt);
  auto dz = z.has_value() ? torch::empty({batch, length, dim}, opt) : torch::Tensor();
  auto dB = torch::empty({parts, batch, groups, length, dstate}, opt);
  auto dC = torch::empty({parts, batch, groups, length, dstate}, opt);
  auto dA = torch::empty({batch, dstate, dim}, opt);
  auto dD = Dv.has_value() ? torch::empty({batch, dim}, opt) : torch::Tensor();
  auto dbias = bias.has_value() ? torch::empty({batch, dim}, opt) : torch::Tensor();
  auto dh0 = want_dh0 ? torch::empty({batch, dim, dstate}, opt) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_backward", [&] {
    const auto a = make_args<scalar_t>(u, delta, A, Bm, Cm, Dv, z, bias, c10::nullopt, softplus, chunk);
    scan_backward<scalar_t>(a, starts.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(),
                            dlast.has_value() ? dlast->data_ptr<scalar_t>() : nullptr, du.data_ptr<scalar_t>(),
                            ddelta.data_ptr<scalar_t>(), z.has_value() ? dz.data_ptr<scalar_t>() : nullptr,
                            dB.data_ptr<scalar_t>(), dC.data_ptr<scalar_t>(), dA.data_ptr<scalar_t>(),
                            Dv.has_value() ? dD.data_ptr<scalar_t>() : nullptr,
                            bias.has_value() ? dbias.data_ptr<scalar_t>() : nullptr,
                            want_dh0 ? dh0.data_ptr<scalar_t>() : nullptr, parts);
  });
  return {du, ddelta, dA, dB, dC, dD, dz, dbias, dh0};
}

// ---------------------------------------------------------------- causal depthwise conv1d (+ SiLU), time-major
// out[b, t, d] = bias[d] + sum_k w[k, d] x[b, t - (K - 1) + k, d], optionally SiLU. x (B, L, D) with unit channel
// stride (row strides free), wT (K, D), out (B, L, D). Tasks are (batch, 64-row) tiles walked row by row, so the
// memory access is sequential; the backward recomputes the pre-activation.
constexpr int64_t kConvRows = 64;

template <typename V, typename T> inline V vload_n(const T* p, int64_t n) {
  if (n == static_cast<int64_t>(sizeof(V) / sizeof(T))) return vload<V>(p);
  V v = {};
  std::memcpy(&v, p, n * sizeof(T));
  return v;
}
template <typename V, typename T> inline void vstore_n(T* p, const V& v, int64_t n) {
  if (n == static_cast<int64_t>(sizeof(V) / sizeof(T))) return vstore(p, v);
  std::memcpy(p, &v, n * sizeof(T));
}

template <typename T>
inline Vec<T> conv_pre(const T* xr, int64_t sx_t, const T* wT, const Vec<T>& bv, int64_t t, int64_t d0, int64_t nl,
                       int64_t D, int64_t K) {
  Vec<T> acc = bv;
  for (int64_t k = std::max<int64_t>(0, K - 1 - t); k < K; ++k)
    acc += vload_n<Vec<T>>(wT + k * D + d0, nl) * vload_n<Vec<T>>(xr + (t - (K - 1) + k) * sx_t + d0, nl);
  return acc;
}

template <typename T>
void conv_fwd(const T* x, int64_t sx_b, int64_t sx_t, const T* wT, const T* bias, T* out, int64_t B, int64_t L,
              int64_t D, int64_t K, bool silu) {
  using V = Vec<T>;
  constexpr int W = lanes<T>();
  const int64_t tiles = (L + kConvRows - 1) / kConvRows;
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, t0 = (task % tiles) * kConvRows, t1 = std::min(L, t0 + kConvRows);
      const T* xr = x + b * sx_b;
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t d0 = 0; d0 < D; d0 += W) {
          const int64_t nl = std::min<int64_t>(W, D - d0);
          const V bv = bias ? vload_n<V>(bias + d0, nl) : V{};
          V o = conv_pre(xr, sx_t, wT, bv, t, d0, nl, D, K);
          if (silu) o = o / (vexp(-o) + T(1));
          vstore_n(out + (b * L + t) * D + d0, o, nl);
        }
    }
  });
}

// dx, and per-tile partial dwT (tiles_total, K, D) and dbias (tiles_total, D), summed by the caller in a fixed order.
template <typename T>
void conv_bwd(const T* x, int64_t sx_b, int64_t sx_t, const T* wT, const T* bias, const T* dout, T* dx, T* dw_p,
              T* db_p, int64_t B, int64_t L, int64_t D, int64_t K, bool silu) {
  using V = Vec<T>;
  constexpr int W = lanes<T>();
  const int64_t tiles = (L + kConvRows - 1) / kConvRows;
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> g((kConvRows + K) * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, t0 = (task % tiles) * kConvRows, t1 = std::min(L, t0 + kConvRows);
      const int64_t te = std::min(L, t1 + K - 1);  // dx[s] needs the output gradients of s .. s + K - 1
      const T* xr = x + b * sx_b;
      T* dw = dw_p + task * K * D;
      T* db = db_p ? db_p + task * D : nullptr;
      std::fill(dw, dw + K * D, T(0));
      if (db) std::fill(db, db + D, T(0));
      for (int64_t t = t0; t < te; ++t)
        for (int64_t d0 = 0; d0 < D; d0 += W) {
          const int64_t nl = std::min<int64_t>(W, D - d0);
          V gv = vload_n<V>(dout + (b * L + t) * D + d0, nl);
          if (silu) {
            const V bv = bias ? vload_n<V>(bias + d0, nl) : V{};
            const V pre = conv_pre(xr, sx_t, wT, bv, t, d0, nl, D, K);
            const V sig = T(1) / (vexp(-pre) + T(1));
            gv = gv * (sig * (pre * (T(1) - sig) + T(1)));
          }
          vstore_n(g.data() + (t - t0) * D + d0, gv, nl);
          if (t < t1) {  // weight and bias gradients of this tile's own rows
            for (int64_t k = std::max<int64_t>(0, K - 1 - t); k < K; ++k) {
              const V xv = vload_n<V>(xr + (t - (K - 1) + k) * sx_t + d0, nl);
              vstore_n(dw + k * D + d0, vload_n<V>(dw + k * D + d0, nl) + gv * xv, nl);
            }
            if (db) vstore_n(db + d0, vload_n<V>(db + d0, nl) + gv, nl);
          }
        }
      for (int64_t s = t0; s < t1; ++s)
        for (int64_t d0 = 0; d0 < D; d0 += W) {
          const int64_t nl = std::min<int64_t>(W, D - d0);
          V acc = {};
          for (int64_t k = 0; k < K; ++k) {
            const int64_t t = s + (K - 1) - k;
            if (t < te) acc += vload_n<V>(wT + k * D + d0, nl) * vload_n<V>(g.data() + (t - t0) * D + d0, nl);
          }
          vstore_n(dx + (b * L + s) * D + d0, acc, nl);
        }
    }
  });
}

torch::Tensor conv_forward(torch::Tensor x, torch::Tensor wT, c10::optional<torch::Tensor> bias, bool silu) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x: (B, L, D) with unit channel stride");
  TORCH_CHECK(wT.dim() == 2 && wT.is_contiguous() && wT.size(1) == x.size(2) && wT.scalar_type() == x.scalar_type(),
              "wT: (K, D) contiguous");
  if (bias.has_value())
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == x.size(2) && bias->scalar_type() == x.scalar_type(), "bias");
  auto out = torch::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_cpu_forward", [&] {
    conv_fwd<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), wT.data_ptr<scalar_t>(),
                       bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), x.size(0),
                       x.size(1), x.size(2), wT.size(0), silu);
  });
  return out;
}

std::vector<torch::Tensor> conv_backward(torch::Tensor x, torch::Tensor wT, c10::optional<torch::Tensor> bias,
                                         torch::Tensor dout, bool silu) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x: (B, L, D) with unit channel stride");
  TORCH_CHECK(dout.is_contiguous() && dout.sizes() == x.sizes() && dout.scalar_type() == x.scalar_type(), "dout");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), K = wT.size(0);
  const int64_t tiles = B * ((L + kConvRows - 1) / kConvRows);
  auto dx = torch::empty({B, L, D}, x.options());
  auto dw = torch::empty({tiles, K, D}, x.options());
  auto db = bias.has_value() ? torch::empty({tiles, D}, x.options()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_cpu_backward", [&] {
    conv_bwd<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), wT.data_ptr<scalar_t>(),
                       bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, dout.data_ptr<scalar_t>(),
                       dx.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(),
                       bias.has_value() ? db.data_ptr<scalar_t>() : nullptr, B, L, D, K, silu);
  });
  return {dx, dw, db};
}

// ---------------------------------------------------------------- one position per row (a task token's step)
// The Mamba mixer between in_proj and out_proj for a single position read after a state (KitModel.task_step). For
// one position the per-op costs of a dozen PyTorch ops on (B, D, N) tensors were most of the step; fused, each row
// is a few passes over its D channels. Rows are independent, so a row's bits do not depend on the batch it is in.

// out[b, d] = silu(bias[d] + sum_{k < K-1} wT[k, d] state[b, d, k] + wT[K-1, d] x[b, d]); x (B, D) row stride sx,
// state (B, D, K-1) contiguous, wT (K, D) contiguous. Channels are the SIMD lanes.
template <typename T>
void conv_step_impl(const T* x, int64_t sx, const T* state, const T* wT, const T* bias, T* out, int64_t B, int64_t D,
                    int64_t K) {
  using V = Vec<T>;
  constexpr int W = lanes<T>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* sr = state + b * D * (K - 1);
      for (int64_t d0 = 0; d0 < D; d0 += W) {
        const int64_t nl = std::min<int64_t>(W, D - d0);
        V acc = bias ? vload_n<V>(bias + d0, nl) : V{};
        for (int64_t k = 0; k < K - 1; ++k) {
          V sv = {};
          for (int64_t l = 0; l < nl; ++l) sv[l] = sr[(d0 + l) * (K - 1) + k];
          acc += vload_n<V>(wT + k * D + d0, nl) * sv;
        }
        acc += vload_n<V>(wT + (K - 1) * D + d0, nl) * vload_n<V>(x + b * sx + d0, nl);
        vstore_n(out + b * D + d0, acc / (vexp(-acc) + T(1)), nl);
      }
    }
  });
}

// y[b, d] = (sum_n C[n] exp(dt A[d, n]) h[b, d, n] + dt x (B . C) + Dv[d] x) * silu(z), dt = softplus(delta[b, d])
// (or delta): the read-out of the next state without writing it. x, delta, z (B, D) with row strides; bc (B, >= 2N)
// with B at [0, N) and C at [N, 2N) of each row; A (D, N), h (B, D, N) contiguous. The N states are the SIMD lanes.
template <typename T>
void ssm_step_impl(const T* x, int64_t sx, const T* delta, int64_t sdl, const T* A, const T* bc, int64_t sbc,
                   const T* Dv, const T* z, int64_t sz, const T* h, T* y, int64_t B, int64_t D, int64_t N,
                   bool softplus) {
  using V = Vec<T>;
  constexpr int W = lanes<T>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> dtb(D), yb(D);
    for (int64_t b = begin; b < end; ++b) {
      const T* xr = x + b * sx;
      const T* Bn = bc + b * sbc;
      const T* Cn = Bn + N;
      for (int64_t d0 = 0; d0 < D; d0 += W) {
        const int64_t nl = std::min<int64_t>(W, D - d0);
        V dt = vload_n<V>(delta + b * sdl + d0, nl), dsp;
        if (softplus) softplus_fwd(V(dt), dt, dsp);
        vstore_n(dtb.data() + d0, dt, nl);
      }
      T bcdot = 0;
      for (int64_t n = 0; n < N; ++n) bcdot += Bn[n] * Cn[n];
      for (int64_t d = 0; d < D; ++d) {
        const V dtv = splat<V>(dtb[d]);
        const T* hr = h + (b * D + d) * N;
        const T* ar = A + d * N;
        V acc = {};
        for (int64_t n0 = 0; n0 < N; n0 += W) {
          const int64_t nl = std::min<int64_t>(W, N - n0);  // absent lanes read zeros: they add nothing
          acc += vexp(dtv * vload_n<V>(ar + n0, nl)) * vload_n<V>(hr + n0, nl) * vload_n<V>(Cn + n0, nl);
        }
        yb[d] = hsum<T>(acc);
      }
      for (int64_t d0 = 0; d0 < D; d0 += W) {
        const int64_t nl = std::min<int64_t>(W, D - d0);
        const V xv = vload_n<V>(xr + d0, nl);
        const V zz = vload_n<V>(z + b * sz + d0, nl);
        V out = vload_n<V>(yb.data() + d0, nl) + vload_n<V>(dtb.data() + d0, nl) * xv * bcdot;
        if (Dv) out += vload_n<V>(Dv + d0, nl) * xv;
        vstore_n(y + b * D + d0, out * (zz / (vexp(-zz) + T(1))), nl);
      }
    }
  });
}

void check_rows(const torch::Tensor& t, int64_t B, int64_t D, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) >= D && t.stride(1) == 1, what, ": (B, D) rows, unit stride");
}

torch::Tensor conv_step(torch::Tensor x, torch::Tensor state, torch::Tensor wT, c10::optional<torch::Tensor> bias) {
  const int64_t B = x.size(0), D = state.size(1), K = wT.size(0);
  check_rows(x, B, D, "x");
  TORCH_CHECK(state.dim() == 3 && state.is_contiguous() && state.size(0) == B && state.size(2) == K - 1,
              "state: (B, D, K - 1) contiguous");
  TORCH_CHECK(wT.dim() == 2 && wT.is_contiguous() && wT.size(1) == D, "wT: (K, D) contiguous");
  for (const auto* t : {&state, &wT}) TORCH_CHECK(t->scalar_type() == x.scalar_type(), "inputs must share a dtype");
  if (bias.has_value())
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == D && bias->scalar_type() == x.scalar_type(), "bias: (D,)");
  auto out = torch::empty({B, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_step_cpu", [&] {
    conv_step_impl<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), state.data_ptr<scalar_t>(), wT.data_ptr<scalar_t>(),
                             bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), B, D, K);
  });
  return out;
}

torch::Tensor ssm_step(torch::Tensor x, torch::Tensor delta, torch::Tensor A, torch::Tensor bc,
                       c10::optional<torch::Tensor> Dv, torch::Tensor z, torch::Tensor h, bool softplus) {
  const int64_t B = x.size(0), D = A.size(0), N = A.size(1);
  check_rows(x, B, D, "x");
  check_rows(delta, B, D, "delta");
  check_rows(z, B, D, "z");
  check_rows(bc, B, 2 * N, "bc");
  TORCH_CHECK(A.is_contiguous() && A.dim() == 2, "A: (D, N) contiguous");
  TORCH_CHECK(h.is_contiguous() && h.dim() == 3 && h.size(0) == B && h.size(1) == D && h.size(2) == N,
              "h: (B, D, N) contiguous");
  for (const auto* t : {&delta, &A, &bc, &z, &h})
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "inputs must share a dtype");
  if (Dv.has_value())
    TORCH_CHECK(Dv->is_contiguous() && Dv->numel() == D && Dv->scalar_type() == x.scalar_type(), "D: (D,)");
  auto y = torch::empty({B, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssm_step_cpu", [&] {
    ssm_step_impl<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), delta.data_ptr<scalar_t>(), delta.stride(0),
                            A.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(), bc.stride(0),
                            Dv.has_value() ? Dv->data_ptr<scalar_t>() : nullptr, z.data_ptr<scalar_t>(), z.stride(0),
                            h.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), B, D, N, softplus);
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "selective scan forward (CPU)");
  m.def("backward", &backward, "selective scan backward (CPU)");
  m.def("conv_forward", &conv_forward, "causal depthwise conv1d (+ SiLU) forward, time-major (CPU)");
  m.def("conv_backward", &conv_backward, "causal depthwise conv1d (+ SiLU) backward, time-major (CPU)");
  m.def("conv_step", &conv_step, "causal depthwise conv1d + SiLU for one position after a state (CPU)");
  m.def("ssm_step", &ssm_step, "selective SSM read-out for one position after a state (CPU)");
  m.def("vector_bytes", [] { return kVecBytes; }, "SIMD vector width the extension was built for, in bytes");
  m.def("isa", [] { return std::string(kIsa) + (kFma ? "+fma" : ""); }, "instruction set the build targets");
}
