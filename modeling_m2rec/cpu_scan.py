"""Fused CPU selective scan: a C++ loop compiled on first use with torch's cpp_extension.

The plain-PyTorch scan has to materialise (B, D, T, N) tensors for every chunk of T steps and is
bound by memory traffic; this loop keeps the state h (N,) of one (batch, channel) row in registers,
so it reads each input once and writes each output once. The backward recomputes the states of a
row into a thread-local (L, N) buffer instead of storing them, so nothing of size (B, D, L, N)
ever exists.

Shapes: B batch, D channels (d_inner), L length, N state size; the conventions are those of
mamba-ssm's `selective_scan_fn` (see `selective_scan.selective_scan_ref`).

The extension is compiled once per source/torch version into TORCH_EXTENSIONS_DIR (the first build
takes about half a minute on two cores) and loaded from there afterwards. Where no compiler or
ninja is found, `load_cpu_scan` returns None, logs why once, and callers fall back to PyTorch.
"""

import hashlib
import logging
import platform
import sys
import threading
import time

import torch


logger = logging.getLogger(__name__)

_CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/AccumulateType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

// One binary serves every x86-64 CPU: the row kernels are cloned for AVX-512/AVX2 and the loader
// picks the best clone at run time, so the cached build never depends on the compiling machine.
#if defined(__has_attribute)
#if __has_attribute(target_clones) && defined(__x86_64__) && defined(__ELF__)
#define M2REC_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef M2REC_CLONES
#define M2REC_CLONES
#endif

#if defined(__GNUC__)
#define M2REC_INLINE inline __attribute__((always_inline))
#else
#define M2REC_INLINE inline
#endif

namespace {

// exp for float written so that the compiler can vectorise loops that call it (std::exp does not
// vectorise without -ffast-math). Cody-Waite range reduction x = k ln2 + r, |r| <= ln2/2, and the
// Cephes degree-6 polynomial: about 1 ulp. Inputs below -87.3 (whose exp is below the smallest
// normal float) give exactly 0 rather than slow denormals.
M2REC_INLINE float exp_vec(float x) {
  const float lo = -87.33654f;
  const float xc = std::min(std::max(x, lo), 88.37626f);
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a library call.
  const float round_magic = 12582912.0f;
  const float k = (xc * 1.44269504088896341f + round_magic) - round_magic;
  const float r = (xc - k * 0.693359375f) + k * 2.12194440e-4f;
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
  return x < lo ? 0.0f : p * scale;
}

// float64 is the precision of tests, not of speed: the library exp is exact to the last bit.
M2REC_INLINE double exp_vec(double x) { return std::exp(x); }

template <typename T>
M2REC_INLINE T softplus(T x) {
  // torch.nn.functional.softplus with its default threshold of 20.
  return x > T(20) ? x : std::log1p(std::exp(x));
}

template <typename T>
M2REC_INLINE T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <typename T>
struct Row {
  // Pointers into contiguous tensors for one (b, d): u, delta, z, out are (L,); A is (N,);
  // Bt, Ct are (L, N) (shared by every d of batch element b).
  const T* u;
  const T* delta;
  const T* z;  // nullptr without gating
  const T* A;
  const T* Bt;
  const T* Ct;
  T D;
  T bias;
  bool softplus;
  int64_t L;
  int64_t N;
};

template <typename T>
M2REC_INLINE T step_size(const Row<T>& r, int64_t t) {
  const T dt = r.delta[t] + r.bias;
  return r.softplus ? softplus(dt) : dt;
}

// Forward of one row: out (L,), h (N,) receives the last state.
template <typename T>
M2REC_INLINE void forward_row(const Row<T>& r, T* out, T* h) {
  const int64_t N = r.N;
  for (int64_t n = 0; n < N; ++n) h[n] = T(0);
  for (int64_t t = 0; t < r.L; ++t) {
    const T dt = step_size(r, t);
    const T dtu = dt * r.u[t];
    const T* Bn = r.Bt + t * N;
    const T* Cn = r.Ct + t * N;
    T y = T(0);
#pragma omp simd reduction(+ : y)
    for (int64_t n = 0; n < N; ++n) {
      const T hn = exp_vec(dt * r.A[n]) * h[n] + dtu * Bn[n];
      h[n] = hn;
      y += Cn[n] * hn;
    }
    y += r.D * r.u[t];
    if (r.z != nullptr) {
      const T zt = r.z[t];
      y *= zt * sigmoid(zt);
    }
    out[t] = y;
  }
}

template <typename T>
struct RowGrad {
  // Outputs of one row: du, ddelta, dz (nullptr without gating) are (L,) and written;
  // dA (N,), dD, dbias are this row's partial sums over t (accumulation type);
  // dBt, dCt (L, N) are summed over the rows of one batch element, so they are added to.
  using acc_t = at::acc_type<T, false>;
  T* du;
  T* ddelta;
  T* dz;
  acc_t* dA;
  acc_t* dD;
  acc_t* dbias;
  T* dBt;
  T* dCt;
};

// Backward of one row. `hs` ((L + 1) * N) receives h_{-1} = 0, h_0, ..., h_{L-1}; `dts` and `ys`
// (L,) the step sizes and the outputs before gating. `g` (N,) is scratch.
template <typename T>
M2REC_INLINE void backward_row(const Row<T>& r, const T* dout, const RowGrad<T>& gr, T* hs,
                               T* dts, T* ys, T* g) {
  using acc_t = at::acc_type<T, false>;
  const int64_t N = r.N;
  for (int64_t n = 0; n < N; ++n) hs[n] = T(0);
  for (int64_t t = 0; t < r.L; ++t) {
    const T dt = step_size(r, t);
    const T dtu = dt * r.u[t];
    const T* Bn = r.Bt + t * N;
    const T* Cn = r.Ct + t * N;
    const T* hprev = hs + t * N;
    T* hn = hs + (t + 1) * N;
    T y = T(0);
#pragma omp simd reduction(+ : y)
    for (int64_t n = 0; n < N; ++n) {
      hn[n] = exp_vec(dt * r.A[n]) * hprev[n] + dtu * Bn[n];
      y += Cn[n] * hn[n];
    }
    dts[t] = dt;
    ys[t] = y + r.D * r.u[t];
  }

  // g holds dL/dh_t; entering step t it holds exp(dt_{t+1} A) * dL/dh_{t+1}.
  for (int64_t n = 0; n < N; ++n) g[n] = T(0);
  acc_t dD = 0, dbias = 0;
  for (int64_t t = r.L - 1; t >= 0; --t) {
    const T dt = dts[t];
    const T ut = r.u[t];
    T dy = dout[t];
    if (r.z != nullptr) {
      const T zt = r.z[t];
      const T sz = sigmoid(zt);
      gr.dz[t] = dout[t] * ys[t] * sz * (T(1) + zt * (T(1) - sz));
      dy = dout[t] * zt * sz;
    }
    dD += static_cast<acc_t>(dy * ut);
    const T* Bn = r.Bt + t * N;
    const T* Cn = r.Ct + t * N;
    const T* hprev = hs + t * N;
    const T* hn = hs + (t + 1) * N;
    T* dBn = gr.dBt + t * N;
    T* dCn = gr.dCt + t * N;
    const T dtu = dt * ut;
    T gB = T(0);   // sum_n dL/dh_t[n] * B_t[n]
    T gdA = T(0);  // dL/d(dt) through the decays exp(dt A)
#pragma omp simd reduction(+ : gB, gdA)
    for (int64_t n = 0; n < N; ++n) {
      const T gn = g[n] + dy * Cn[n];
      const T a = exp_vec(dt * r.A[n]);
      const T ga = gn * hprev[n] * a;  // dL/d(dt A[n])
      dCn[n] += dy * hn[n];
      dBn[n] += gn * dtu;
      gr.dA[n] += static_cast<acc_t>(ga * dt);
      gdA += ga * r.A[n];
      gB += gn * Bn[n];
      g[n] = gn * a;
    }
    gr.du[t] = dy * r.D + dt * gB;
    T ddt = gdA + ut * gB;
    if (r.softplus) {
      const T x = r.delta[t] + r.bias;
      ddt *= x > T(20) ? T(1) : sigmoid(x);
    }
    gr.ddelta[t] = ddt;
    dbias += static_cast<acc_t>(ddt);
  }
  *gr.dD = dD;
  *gr.dbias = dbias;
}

// Non-template entry points so that the target clones apply (float and double each).
M2REC_CLONES void forward_rows_f32(const Row<float>* rows, float* const* outs, float* const* hs,
                                   int64_t count) {
  for (int64_t i = 0; i < count; ++i) forward_row(rows[i], outs[i], hs[i]);
}
M2REC_CLONES void forward_rows_f64(const Row<double>* rows, double* const* outs,
                                   double* const* hs, int64_t count) {
  for (int64_t i = 0; i < count; ++i) forward_row(rows[i], outs[i], hs[i]);
}
M2REC_CLONES void backward_row_f32(const Row<float>& r, const float* dout,
                                   const RowGrad<float>& gr, float* hs, float* dts, float* ys,
                                   float* g) {
  backward_row(r, dout, gr, hs, dts, ys, g);
}
M2REC_CLONES void backward_row_f64(const Row<double>& r, const double* dout,
                                   const RowGrad<double>& gr, double* hs, double* dts,
                                   double* ys, double* g) {
  backward_row(r, dout, gr, hs, dts, ys, g);
}

void forward_rows(const Row<float>* rows, float* const* outs, float* const* hs, int64_t count) {
  forward_rows_f32(rows, outs, hs, count);
}
void forward_rows(const Row<double>* rows, double* const* outs, double* const* hs,
                  int64_t count) {
  forward_rows_f64(rows, outs, hs, count);
}
void backward_one(const Row<float>& r, const float* dout, const RowGrad<float>& gr, float* hs,
                  float* dts, float* ys, float* g) {
  backward_row_f32(r, dout, gr, hs, dts, ys, g);
}
void backward_one(const Row<double>& r, const double* dout, const RowGrad<double>& gr,
                  double* hs, double* dts, double* ys, double* g) {
  backward_row_f64(r, dout, gr, hs, dts, ys, g);
}

struct Inputs {
  at::Tensor u, delta, A, Bt, Ct, D, z, delta_bias;  // D, z, delta_bias undefined when absent
  int64_t batch, dim, L, N;
};

Inputs check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                    const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                    const std::optional<at::Tensor>& z,
                    const std::optional<at::Tensor>& delta_bias) {
  TORCH_CHECK(u.dim() == 3, "u must be (B, D, L), got ", u.sizes());
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, "A must be (D, N) with D=", dim, ", got ",
              A.sizes());
  const int64_t N = A.size(1);
  TORCH_CHECK(delta.sizes() == u.sizes(), "delta must match u ", u.sizes(), ", got ",
              delta.sizes());
  for (const at::Tensor* t : {&B, &C}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == batch && t->size(1) == N && t->size(2) == L,
                "B and C must be (B, N, L) = (", batch, ", ", N, ", ", L, "), got ", t->sizes());
  }
  const auto dtype = u.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "float32 or float64 expected, got ",
              dtype);
  Inputs in;
  auto prep = [&](const at::Tensor& t) {
    TORCH_CHECK(t.device().is_cpu(), "CPU tensors expected");
    TORCH_CHECK(t.scalar_type() == dtype, "all inputs must share u's dtype ", dtype, ", got ",
                t.scalar_type());
    return t.contiguous();
  };
  in.u = prep(u);
  in.delta = prep(delta);
  in.A = prep(A);
  in.Bt = prep(B).transpose(1, 2).contiguous();  // (B, L, N): the n loop reads contiguous memory
  in.Ct = prep(C).transpose(1, 2).contiguous();
  if (D.has_value()) {
    TORCH_CHECK(D->numel() == dim, "D must have D=", dim, " entries, got ", D->sizes());
    in.D = prep(*D);
  }
  if (z.has_value()) {
    TORCH_CHECK(z->sizes() == u.sizes(), "z must match u ", u.sizes(), ", got ", z->sizes());
    in.z = prep(*z);
  }
  if (delta_bias.has_value()) {
    TORCH_CHECK(delta_bias->numel() == dim, "delta_bias must have D=", dim, " entries, got ",
                delta_bias->sizes());
    in.delta_bias = prep(*delta_bias);
  }
  in.batch = batch;
  in.dim = dim;
  in.L = L;
  in.N = N;
  return in;
}

template <typename T>
Row<T> make_row(const Inputs& in, bool softplus, int64_t b, int64_t d) {
  const int64_t L = in.L, N = in.N, row = b * in.dim + d;
  Row<T> r;
  r.u = in.u.data_ptr<T>() + row * L;
  r.delta = in.delta.data_ptr<T>() + row * L;
  r.z = in.z.defined() ? in.z.data_ptr<T>() + row * L : nullptr;
  r.A = in.A.data_ptr<T>() + d * N;
  r.Bt = in.Bt.data_ptr<T>() + b * L * N;
  r.Ct = in.Ct.data_ptr<T>() + b * L * N;
  r.D = in.D.defined() ? in.D.data_ptr<T>()[d] : T(0);
  r.bias = in.delta_bias.defined() ? in.delta_bias.data_ptr<T>()[d] : T(0);
  r.softplus = softplus;
  r.L = L;
  r.N = N;
  return r;
}

// Rows per task such that a task holds at least ~64k state updates; threads cost more below.
int64_t grain_rows(int64_t L, int64_t N) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, L * N));
}

std::vector<at::Tensor> fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& C,
                            const std::optional<at::Tensor>& D,
                            const std::optional<at::Tensor>& z,
                            const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  const Inputs in = check_inputs(u, delta, A, B, C, D, z, delta_bias);
  at::Tensor out = at::empty({in.batch, in.dim, in.L}, in.u.options());
  at::Tensor last = at::empty({in.batch, in.dim, in.N}, in.u.options());
  AT_DISPATCH_FLOATING_TYPES(in.u.scalar_type(), "m2rec_selective_scan_fwd", [&] {
    at::parallel_for(0, in.batch * in.dim, grain_rows(in.L, in.N), [&](int64_t lo, int64_t hi) {
      std::vector<Row<scalar_t>> rows;
      std::vector<scalar_t*> outs, hs;
      for (int64_t i = lo; i < hi; ++i) {
        rows.push_back(make_row<scalar_t>(in, delta_softplus, i / in.dim, i % in.dim));
        outs.push_back(out.data_ptr<scalar_t>() + i * in.L);
        hs.push_back(last.data_ptr<scalar_t>() + i * in.N);
      }
      forward_rows(rows.data(), outs.data(), hs.data(), hi - lo);
    });
  });
  return {out, last};
}

// Returns du, ddelta, dA, dB, dC, dD, dz, ddelta_bias (undefined where the input was absent).
std::vector<at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta,
                            const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                            const std::optional<at::Tensor>& D,
                            const std::optional<at::Tensor>& z,
                            const std::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  const Inputs in = check_inputs(u, delta, A, B, C, D, z, delta_bias);
  TORCH_CHECK(dout.sizes() == u.sizes(), "dout must match u ", u.sizes(), ", got ", dout.sizes());
  const at::Tensor g_out = dout.to(in.u.scalar_type()).contiguous();
  const int64_t batch = in.batch, dim = in.dim, L = in.L, N = in.N;
  const auto acc_dtype = at::toAccumulateType(in.u.scalar_type(), /*is_cuda=*/false);

  // dB and dC sum over channels. Tasks own a batch element and a block of channels; each block
  // writes its own (B, L, N) partial sum, so no two threads touch the same memory. With at least
  // as many batch elements as threads, a single block (no partials to add) keeps every thread busy.
  const int64_t threads = at::get_num_threads();
  const int64_t blocks = std::min<int64_t>(dim, (threads + batch - 1) / batch);
  const int64_t block_dim = (dim + blocks - 1) / blocks;
  at::Tensor du = at::empty_like(in.u), ddelta = at::empty_like(in.u);
  at::Tensor dz = in.z.defined() ? at::empty_like(in.z) : at::Tensor();
  at::Tensor dBt = at::zeros({blocks, batch, L, N}, in.u.options());
  at::Tensor dCt = at::zeros({blocks, batch, L, N}, in.u.options());
  // Per-(b, d) partial sums for the parameters, added over b at the end in the accumulation type.
  const auto acc_options = in.u.options().dtype(acc_dtype);
  at::Tensor dA_part = at::empty({batch, dim, N}, acc_options);
  at::Tensor dD_part = at::empty({batch, dim}, acc_options);
  at::Tensor dbias_part = at::empty({batch, dim}, acc_options);

  AT_DISPATCH_FLOATING_TYPES(in.u.scalar_type(), "m2rec_selective_scan_bwd", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const int64_t grain = std::max<int64_t>(1, grain_rows(L, N) / block_dim);
    at::parallel_for(0, batch * blocks, grain, [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> hs((L + 1) * N), dts(L), ys(L), g(N);
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / blocks, block = task % blocks;
        const int64_t bl_offset = (block * batch + b) * L * N;
        for (int64_t d = block * block_dim; d < std::min(dim, (block + 1) * block_dim); ++d) {
          const int64_t row = b * dim + d;
          RowGrad<scalar_t> gr;
          gr.du = du.data_ptr<scalar_t>() + row * L;
          gr.ddelta = ddelta.data_ptr<scalar_t>() + row * L;
          gr.dz = dz.defined() ? dz.data_ptr<scalar_t>() + row * L : nullptr;
          gr.dA = dA_part.data_ptr<acc_t>() + row * N;
          std::fill(gr.dA, gr.dA + N, acc_t(0));
          gr.dD = dD_part.data_ptr<acc_t>() + row;
          gr.dbias = dbias_part.data_ptr<acc_t>() + row;
          gr.dBt = dBt.data_ptr<scalar_t>() + bl_offset;
          gr.dCt = dCt.data_ptr<scalar_t>() + bl_offset;
          backward_one(make_row<scalar_t>(in, delta_softplus, b, d),
                       g_out.data_ptr<scalar_t>() + row * L, gr, hs.data(), dts.data(),
                       ys.data(), g.data());
        }
      }
    });
  });

  const auto dtype = in.u.scalar_type();
  at::Tensor dA = dA_part.sum(0).to(dtype);
  // (blocks, B, L, N) -> (B, N, L), the layout of the inputs B and C
  at::Tensor dB = dBt.sum(0).transpose(1, 2).contiguous();
  at::Tensor dC = dCt.sum(0).transpose(1, 2).contiguous();
  at::Tensor dD = in.D.defined() ? dD_part.sum(0).to(dtype) : at::Tensor();
  at::Tensor dbias = in.delta_bias.defined() ? dbias_part.sum(0).to(dtype) : at::Tensor();
  return {du, ddelta, dA, dB, dC, dD, dz, dbias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "selective scan forward: (out (B, D, L), last state (B, D, N))");
  m.def("bwd", &bwd, "selective scan backward: du, ddelta, dA, dB, dC, dD, dz, ddelta_bias");
}
"""


def _build_flags():
    """Compiler flags: -O3, `omp simd` for the n loops, and OpenMP so that at::parallel_for runs
    on torch's thread pool (torch's wheels ship libgomp, which the extension then shares)."""
    if sys.platform == "win32":
        return ["/O2", "/openmp"], []
    flags = ["-O3", "-fopenmp-simd"]
    if sys.platform.startswith("linux"):
        return flags + ["-fopenmp"], ["-fopenmp"]
    return flags, []


def _extension_name():
    # A new source, torch version or architecture gets its own build folder instead of loading a
    # stale binary compiled for another one.
    key = "\n".join([_CPP_SOURCE, torch.__version__, platform.machine(), repr(_build_flags())])
    return "m2rec_cpu_scan_" + hashlib.sha256(key.encode()).hexdigest()[:16]


_UNSET = object()
_module = _UNSET
_lock = threading.Lock()


def load_cpu_scan():
    """The compiled extension (with `fwd` and `bwd`), or None where it cannot be built.

    The first call compiles (or loads the cached build); later calls return the same answer. A
    failure is logged once with its reason, e.g. no C++ compiler or no ninja.
    """
    global _module
    with _lock:
        if _module is _UNSET:
            try:
                from torch.utils.cpp_extension import load_inline

                start = time.perf_counter()
                _module = load_inline(
                    name=_extension_name(),
                    cpp_sources=[_CPP_SOURCE],
                    extra_cflags=_build_flags()[0],
                    extra_ldflags=_build_flags()[1],
                    verbose=False,
                )
                logger.info("fused CPU selective scan ready in %.1f s", time.perf_counter() - start)
            except Exception as error:  # any failure to build means: use the PyTorch scan
                logger.warning(
                    "could not build the fused CPU selective scan (%s: %s); the plain PyTorch "
                    "scan will be used instead, which is several times slower on CPU",
                    type(error).__name__,
                    str(error).strip().splitlines()[-1] if str(error).strip() else "",
                )
                _module = None
        return _module


class SelectiveScanCPUFn(torch.autograd.Function):
    """Autograd wrapper of the fused forward and backward; the last state gets no gradient."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        extension = load_cpu_scan()
        out, last_state = extension.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = delta_softplus
        ctx.mark_non_differentiable(last_state)
        return out, last_state

    @staticmethod
    def backward(ctx, dout, _dlast_state):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        grads = load_cpu_scan().bwd(dout, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus)
        return (*grads, None)


def selective_scan_cpu(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """The fused CPU selective scan; same signature and result as `selective_scan_ref`.

    Args: u, delta, z (B, D, L); A (D, N); B, C (B, N, L); D, delta_bias (D,).
    Returns out (B, D, L), and the last state (B, D, N) if `return_last_state`.
    Raises RuntimeError where the extension cannot be built (see `load_cpu_scan`).
    """
    if load_cpu_scan() is None:
        raise RuntimeError("the fused CPU selective scan could not be built; see the log")
    # Half-precision inputs are computed in float32, as mamba-ssm does.
    compute_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32

    def cast(t):
        return None if t is None else t.to(compute_dtype)

    out, last_state = SelectiveScanCPUFn.apply(
        cast(u), cast(delta), cast(A), cast(B), cast(C), cast(D), cast(z), cast(delta_bias),
        bool(delta_softplus),
    )
    out = out.to(u.dtype)
    return (out, last_state) if return_last_state else out


__all__ = ["load_cpu_scan", "selective_scan_cpu", "SelectiveScanCPUFn"]
