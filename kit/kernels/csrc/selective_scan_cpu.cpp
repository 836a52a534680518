// Fused selective scan on CPU: one (batch, channel) pair per task, the N-float state in a local array.
//
// Layouts (all contiguous, made so by scan_cpu.py): u, delta (B, D, L); A (D, N); Bt, Ct (B, G, L, N) with
// time-major rows so the inner loop over N is unit-stride; h0 (B, D, N) or empty. The forward keeps the state
// at the start of every chunk of `chunk` steps; the backward recomputes each chunk's states from it.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// exp(x) for float without libm calls, so loops over the state vectorize with baseline SIMD (SSE2/NEON):
// x = k ln2 + r with |r| <= ln2/2, exp(r) by a degree-7 polynomial (Cephes' expf coefficients), 2^k by
// building the float's exponent bits. Relative error ~2 ulp; inputs are clamped to [-87, 88] (exp(-87) ~ 2e-38
// stands in for anything smaller, the normal-float range).
inline float exp_approx(float x) {
  x = x > -87.0f ? x : -87.0f;
  x = x < 88.0f ? x : 88.0f;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  float k = (x * 1.44269504088896341f + magic) - magic;
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double exp_approx(double x) { return std::exp(x); }  // fp64 runs are for checks: keep libm's exp

// Dot product with 8 fixed partial sums: vectorizes without -ffast-math, and the summation order (hence the
// result) does not depend on whether the compiler vectorized it.
template <typename scalar_t>
inline scalar_t dot(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t n) {
  scalar_t lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lanes[j] += a[i + j] * b[i + j];
  scalar_t tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail;
}

// kN > 0 fixes the state size at compile time (fully unrolled loops, the state kept in registers).
template <typename scalar_t, int kN>
void scan_forward(const scalar_t* u, const scalar_t* delta, const scalar_t* A, const scalar_t* Bt, const scalar_t* Ct,
                  const scalar_t* h0, scalar_t* y, scalar_t* last, scalar_t* starts, int64_t batch, int64_t dim,
                  int64_t length, int64_t dstate_arg, int64_t groups, int64_t chunk) {
  const int64_t dstate = kN > 0 ? kN : dstate_arg;
  const int64_t nchunks = (length + chunk - 1) / chunk;
  const int64_t hdim = dim / groups;
  at::parallel_for(0, batch * dim, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> h_buf(dstate);
    scalar_t* __restrict__ h = h_buf.data();
    for (int64_t bd = begin; bd < end; ++bd) {
      const int64_t b = bd / dim, d = bd % dim, g = d / hdim;
      const scalar_t* u_r = u + bd * length;
      const scalar_t* dt_r = delta + bd * length;
      const scalar_t* A_r = A + d * dstate;
      const scalar_t* B_r = Bt + (b * groups + g) * length * dstate;
      const scalar_t* C_r = Ct + (b * groups + g) * length * dstate;
      scalar_t* y_r = y + bd * length;
      scalar_t* s_r = starts + bd * nchunks * dstate;
      for (int64_t n = 0; n < dstate; ++n) h[n] = h0 ? h0[bd * dstate + n] : scalar_t(0);
      for (int64_t t = 0; t < length; ++t) {
        if (t % chunk == 0) std::copy(h, h + dstate, s_r + (t / chunk) * dstate);
        const scalar_t dt = dt_r[t], x = dt * u_r[t];
        const scalar_t* __restrict__ Bn = B_r + t * dstate;
        for (int64_t n = 0; n < dstate; ++n) h[n] = exp_approx(dt * A_r[n]) * h[n] + x * Bn[n];
        y_r[t] = dot(C_r + t * dstate, h, dstate);
      }
      std::copy(h, h + dstate, last + bd * dstate);
    }
  });
}

// Gradients of sum(dy * y) + sum(dlast * last). dBt/dCt/dA are written into per-block partial buffers
// (`blocks` contiguous ranges of (b, d) pairs, a fixed split so results do not depend on scheduling);
// the caller sums them over the block axis.
template <typename scalar_t, int kN>
void scan_backward(const scalar_t* u, const scalar_t* delta, const scalar_t* A, const scalar_t* Bt,
                   const scalar_t* Ct, const scalar_t* starts, const scalar_t* dy, const scalar_t* dlast,
                   scalar_t* du, scalar_t* ddelta, scalar_t* dA_part, scalar_t* dB_part, scalar_t* dC_part,
                   scalar_t* dh0, int64_t batch, int64_t dim, int64_t length, int64_t dstate_arg, int64_t groups,
                   int64_t chunk, int64_t blocks) {
  const int64_t dstate = kN > 0 ? kN : dstate_arg;
  const int64_t nchunks = (length + chunk - 1) / chunk;
  const int64_t hdim = dim / groups;
  const int64_t total = batch * dim;
  const int64_t bc_size = batch * groups * length * dstate;
  at::parallel_for(0, blocks, 1, [&](int64_t pbegin, int64_t pend) {
    std::vector<scalar_t> hs((chunk + 1) * dstate), decay(chunk * dstate), dh_buf(dstate), s_buf(dstate);
    scalar_t* __restrict__ dh = dh_buf.data();
    scalar_t* __restrict__ sv = s_buf.data();
    for (int64_t p = pbegin; p < pend; ++p) {
      scalar_t* dA_p = dA_part + p * dim * dstate;
      scalar_t* dB_p = dB_part + p * bc_size;
      scalar_t* dC_p = dC_part + p * bc_size;
      const int64_t lo = total * p / blocks, hi = total * (p + 1) / blocks;
      for (int64_t bd = lo; bd < hi; ++bd) {
        const int64_t b = bd / dim, d = bd % dim, g = d / hdim;
        const scalar_t* u_r = u + bd * length;
        const scalar_t* dt_r = delta + bd * length;
        const scalar_t* dy_r = dy + bd * length;
        const scalar_t* A_r = A + d * dstate;
        const int64_t bc_off = (b * groups + g) * length * dstate;
        const scalar_t* B_r = Bt + bc_off;
        const scalar_t* C_r = Ct + bc_off;
        scalar_t* dB_r = dB_p + bc_off;
        scalar_t* dC_r = dC_p + bc_off;
        scalar_t* dA_r = dA_p + d * dstate;
        scalar_t* du_r = du + bd * length;
        scalar_t* ddt_r = ddelta + bd * length;
        for (int64_t n = 0; n < dstate; ++n) dh[n] = dlast ? dlast[bd * dstate + n] : scalar_t(0);
        for (int64_t k = nchunks - 1; k >= 0; --k) {
          const int64_t t0 = k * chunk, steps = std::min(chunk, length - t0);
          // hs[i] = state before step t0 + i; decay[i] = exp(delta A) at that step.
          std::copy(starts + (bd * nchunks + k) * dstate, starts + (bd * nchunks + k + 1) * dstate, hs.begin());
          for (int64_t i = 0; i < steps; ++i) {
            const int64_t t = t0 + i;
            const scalar_t dt = dt_r[t], x = dt * u_r[t];
            const scalar_t* __restrict__ Bn = B_r + t * dstate;
            const scalar_t* __restrict__ hp = hs.data() + i * dstate;
            scalar_t* __restrict__ hn = hs.data() + (i + 1) * dstate;
            scalar_t* __restrict__ a = decay.data() + i * dstate;
            for (int64_t n = 0; n < dstate; ++n) {
              a[n] = exp_approx(dt * A_r[n]);
              hn[n] = a[n] * hp[n] + x * Bn[n];
            }
          }
          for (int64_t i = steps - 1; i >= 0; --i) {
            const int64_t t = t0 + i;
            const scalar_t dt = dt_r[t], ut = u_r[t], gy = dy_r[t];
            const scalar_t* __restrict__ Bn = B_r + t * dstate;
            const scalar_t* __restrict__ Cn = C_r + t * dstate;
            scalar_t* __restrict__ dBn = dB_r + t * dstate;
            scalar_t* __restrict__ dCn = dC_r + t * dstate;
            const scalar_t* __restrict__ hp = hs.data() + i * dstate;
            const scalar_t* __restrict__ hn = hs.data() + (i + 1) * dstate;
            const scalar_t* __restrict__ a = decay.data() + i * dstate;
            const scalar_t x = dt * ut;
            for (int64_t n = 0; n < dstate; ++n) {
              dCn[n] += gy * hn[n];
              dh[n] += gy * Cn[n];  // now dL/dh_t
              dBn[n] += dh[n] * x;
            }
            const scalar_t sum_dhB = dot(dh, Bn, dstate);
            for (int64_t n = 0; n < dstate; ++n) {
              sv[n] = dh[n] * a[n] * hp[n];  // dL/d(delta_t A_n)
              dA_r[n] += sv[n] * dt;
              dh[n] *= a[n];
            }
            const scalar_t sum_decay = dot(sv, A_r, dstate);
            du_r[t] = sum_dhB * dt;
            ddt_r[t] = sum_dhB * ut + sum_decay;
          }
        }
        if (dh0) std::copy(dh, dh + dstate, dh0 + bd * dstate);
      }
    }
  });
}

std::vector<torch::Tensor> forward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bt,
                                   torch::Tensor Ct, c10::optional<torch::Tensor> h0, int64_t chunk) {
  const int64_t batch = u.size(0), dim = u.size(1), length = u.size(2), dstate = A.size(1), groups = Bt.size(1);
  const int64_t nchunks = (length + chunk - 1) / chunk;
  auto y = torch::empty_like(u);
  auto last = torch::empty({batch, dim, dstate}, u.options());
  auto starts = torch::empty({batch, dim, nchunks, dstate}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_forward", [&] {
    auto run = dstate == 16 ? scan_forward<scalar_t, 16> : scan_forward<scalar_t, 0>;
    run(u.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                           Bt.data_ptr<scalar_t>(), Ct.data_ptr<scalar_t>(),
                           h0.has_value() ? h0->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                           last.data_ptr<scalar_t>(), starts.data_ptr<scalar_t>(), batch, dim, length, dstate,
                           groups, chunk);
  });
  return {y, last, starts};
}

std::vector<torch::Tensor> backward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bt,
                                    torch::Tensor Ct, torch::Tensor starts, torch::Tensor dy,
                                    c10::optional<torch::Tensor> dlast, bool want_dh0, int64_t chunk) {
  const int64_t batch = u.size(0), dim = u.size(1), length = u.size(2), dstate = A.size(1), groups = Bt.size(1);
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch * dim));
  auto du = torch::empty_like(u);
  auto ddelta = torch::empty_like(u);
  auto dA = torch::zeros({blocks, dim, dstate}, u.options());
  auto dB = torch::zeros({blocks, batch, groups, length, dstate}, u.options());
  auto dC = torch::zeros({blocks, batch, groups, length, dstate}, u.options());
  auto dh0 = want_dh0 ? torch::empty({batch, dim, dstate}, u.options()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_backward", [&] {
    auto run = dstate == 16 ? scan_backward<scalar_t, 16> : scan_backward<scalar_t, 0>;
    run(u.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                            Bt.data_ptr<scalar_t>(), Ct.data_ptr<scalar_t>(), starts.data_ptr<scalar_t>(),
                            dy.data_ptr<scalar_t>(), dlast.has_value() ? dlast->data_ptr<scalar_t>() : nullptr,
                            du.data_ptr<scalar_t>(), ddelta.data_ptr<scalar_t>(), dA.data_ptr<scalar_t>(),
                            dB.data_ptr<scalar_t>(), dC.data_ptr<scalar_t>(),
                            want_dh0 ? dh0.data_ptr<scalar_t>() : nullptr, batch, dim, length, dstate, groups,
                            chunk, blocks);
  });
  std::vector<torch::Tensor> out = {du, ddelta, dA.sum(0), dB.sum(0), dC.sum(0)};
  if (want_dh0) out.push_back(dh0);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "selective scan forward (CPU)");
  m.def("backward", &backward, "selective scan backward (CPU)");
}
