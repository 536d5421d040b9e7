// Fused CPU kernels for the Mamba mixers' training and prefill: the sequential Mamba-2 (SSD) scan, the
// Mamba-1 selective scan, the causal depthwise conv1d with its SiLU and the (gated) RMSNorm, forward and
// backward.
//
// Plain C ABI (called through ctypes, no torch headers), built once per machine by
// vlm_mamba_hf/cpu_kernels.py with the system C++ compiler. Same contract as ops_ssd.ssd_scan_ref with dt
// already final (bias, softplus and clamp applied), with the skip D * x for one D per head (optional) and
// without the gate, which stays in PyTorch:
//
//   a_t = exp(dt_t * A)                      per (batch, head)
//   S_t = a_t * S_{t-1} + (dt_t x_t) B_t^T   S: (head_dim p, state n), B_t and C_t of the head's group
//   y_t = S_t C_t + D x_t
//
// x, B and C may be slices of a wider tensor (the conv output [x, B, C] of a Mamba-2 mixer): each has its own
// distance between time steps, and so may grad_x.
//
// The forward pass keeps the state in a small per-task buffer and stores it every K steps (the checkpoints);
// the backward pass walks the segments from the last, recomputes the K states of a segment from its
// checkpoint, then steps back through them carrying G = dL/dS_t. The forward pass runs one (batch, head) pair
// per task; the backward pass one (batch, group) pair, all of the group's heads, when there are enough of them
// for the threads (see `backward`), else one (batch, head) pair.
//
// The selective scan (Mamba-1), one (batch, channel) pair per task, state (n,):
//
//   a_t = exp(delta_t * A)                   A: (n,) per channel
//   S_t = a_t * S_{t-1} + delta_t u_t B_t     y_t = S_t . C_t
//
// with u, delta (b, d, L) and B, C given time-major as (b, L, n); checkpoints as for the SSD scan.
//
// The conv: out_t = act(bias + sum_j w_j * e_{t+j}) over the rows of e = [left (k-1 rows); x (L rows)], per
// channel, with x (b, L, c) channels last and w given as (k, c). The backward pass recomputes the
// pre-activation.
//
// The RMSNorm, optionally gated (Mamba-2's norm_before_gate=False): h = x * SiLU(z) (or x), then per group
// of gs channels out = w * h / sqrt(mean(h^2) + eps). The forward pass keeps 1 / sqrt(...) per row and
// group for the backward pass, which recomputes h. x and z may be rows of a wider tensor (a row stride);
// every other array is contiguous and row-major.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// xs: the distance between time steps in x (h * p when contiguous; more when x is a slice of the conv output
// [x, B, C]); bcs: the same for B and C; gxs: for grad_x.
struct Dims {
  int64_t b, L, h, p, g, n, K, xs, bcs, gxs;
  int64_t pn() const { return p * n; }
  int64_t segments() const { return (L + K - 1) / K; }
  int64_t group(int64_t head) const { return head / (h / g); }
};

// Runs f(task) for task in [0, total), split into contiguous ranges over `threads` OpenMP threads. Built with
// -fopenmp, this library links libgomp.so.1 by name and so shares the copy (and the thread pool) that torch
// has already loaded: its workers are the ones torch's own ops use, not a second set competing with them for
// the cores. Built without OpenMP, it runs serially.
template <typename F>
void parallel_for(int64_t total, int threads, F f) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, total));
  if (workers == 1) {
    for (int64_t task = 0; task < total; ++task) f(task);
    return;
  }
#pragma omp parallel for num_threads(static_cast<int>(workers)) schedule(static)
  for (int64_t w = 0; w < workers; ++w) {
    const int64_t begin = total * w / workers, end = total * (w + 1) / workers;
    for (int64_t task = begin; task < end; ++task) f(task);
  }
}

// Rows of one (batch, head) pair are h * p values apart in time; the hardware prefetcher does not follow
// that reliably, so the loops ask for the row a few steps ahead.
constexpr int64_t kPrefetchSteps = 4;

template <typename T>
inline void prefetch_row(const T* row, int64_t count) {
  for (int64_t i = 0; i < count; i += 64 / sizeof(T)) __builtin_prefetch(row + i);
}

// Inside the kernels a state is held transposed, (n, p): every update is then a vertical multiply-add over p
// contiguous values, with no horizontal sums in the forward pass. Arrays crossing the boundary are (p, n).
template <typename T>
inline void load_transposed(const Dims& d, const T* src, T* dst) {
  for (int64_t i = 0; i < d.p; ++i)
    for (int64_t j = 0; j < d.n; ++j) dst[j * d.p + i] = src[i * d.n + j];
}

template <typename T>
inline void store_transposed(const Dims& d, const T* src, T* dst) {
  for (int64_t i = 0; i < d.p; ++i)
    for (int64_t j = 0; j < d.n; ++j) dst[i * d.n + j] = src[j * d.p + i];
}

// One step for one (batch, head): S <- a S_prev + B u^T (S may be S_prev), and y = S^T C when y is not null.
template <typename T, int P>
inline void step_state(const Dims& d, T* S, const T* prev, T decay, T step, const T* xt, const T* Bt,
                       const T* Ct, T* yt, T* u) {
  const int64_t p = P ? P : d.p;
  for (int64_t i = 0; i < p; ++i) u[i] = step * xt[i];
  if (!yt) {
    for (int64_t j = 0; j < d.n; ++j) {
      const T bj = Bt[j];
      const T* Pj = prev + j * p;
      T* Sj = S + j * p;
#pragma omp simd
      for (int64_t i = 0; i < p; ++i) Sj[i] = decay * Pj[i] + bj * u[i];
    }
    return;
  }
  // y is summed in a local array (registers when head_dim is a compile-time size): summing it in the output
  // row would make every j wait for the previous j's store.
  constexpr int64_t kLocal = P > 0 ? P : 1;
  T acc_local[kLocal];
  T* acc = P > 0 ? acc_local : yt;
  for (int64_t i = 0; i < p; ++i) acc[i] = 0;
  for (int64_t j = 0; j < d.n; ++j) {
    const T bj = Bt[j], cj = Ct[j];
    const T* Pj = prev + j * p;
    T* Sj = S + j * p;
#pragma omp simd
    for (int64_t i = 0; i < p; ++i) {
      const T s = decay * Pj[i] + bj * u[i];
      Sj[i] = s;
      acc[i] += cj * s;
    }
  }
  if (P > 0) std::memcpy(yt, acc, p * sizeof(T));
}

template <typename T, int P>
void forward(const Dims& d, const T* x, const T* dt, const T* A, const T* B, const T* C, const T* D,
             const T* h0, T* y, T* final_state, T* checkpoints, int threads) {
  const int64_t pn = d.pn(), segments = d.segments();
  parallel_for(d.b * d.h, threads, [&](int64_t bh) {
    const int64_t bi = bh / d.h, hi = bh % d.h, gi = d.group(hi);
    std::vector<T> state(pn, T(0)), u(d.p);
    T* S = state.data();
    if (h0) load_transposed(d, h0 + bh * pn, S);
    for (int64_t t = 0; t < d.L; ++t) {
      if (checkpoints && t % d.K == 0) std::memcpy(checkpoints + (bh * segments + t / d.K) * pn, S, pn * sizeof(T));
      const int64_t row = bi * d.L + t;
      if (t + kPrefetchSteps < d.L) prefetch_row(x + (row + kPrefetchSteps) * d.xs + hi * d.p, d.p);
      const T step = dt[row * d.h + hi];
      const T* xt = x + row * d.xs + hi * d.p;
      T* yt = y + (row * d.h + hi) * d.p;
      step_state<T, P>(d, S, S, static_cast<T>(std::exp(step * A[hi])), step, xt, B + row * d.bcs + gi * d.n,
                       C + row * d.bcs + gi * d.n, yt, u.data());
      if (D) {
        const T skip = D[hi];
#pragma omp simd
        for (int64_t i = 0; i < d.p; ++i) yt[i] += skip * xt[i];
      }
    }
    if (final_state) store_transposed(d, S, final_state + bh * pn);
  });
}

// grad_y and grad_final may be null (no gradient reached them). grad_B and grad_C are per head,
// (b, L, h, n), and grad_A per (batch, head), (b, h): the caller sums them over a group's heads and the batch.
// The backward step over the state dimension with head_dim P a whole number of 64-byte vectors, written
// with GCC/Clang vector types: the accumulators over j (dL/du and dL/da per head_dim channel) stay in
// registers, where the plain loop kept them in memory and every j waited on the previous j's store. Same
// arithmetic, per element, as the plain loop.
constexpr size_t kVecBytes = 64;

typedef float VecF __attribute__((vector_size(kVecBytes)));
typedef double VecD __attribute__((vector_size(kVecBytes)));

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  using type = VecF;
};
template <>
struct VecOf<double> {
  using type = VecD;
};
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
inline Vec<T> load_vec(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store_vec(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// Sums of a vector's lanes by halving (a tree of vector adds, not a chain of scalar ones).
typedef float VecF8 __attribute__((vector_size(32)));
typedef float VecF4 __attribute__((vector_size(16)));
typedef double VecD4 __attribute__((vector_size(32)));
typedef double VecD2 __attribute__((vector_size(16)));

template <typename Half, typename Full>
inline Half fold(Full v) {
  Half lo, hi;
  std::memcpy(&lo, &v, sizeof(Half));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
  return lo + hi;
}

inline float sum_lanes(VecF v) {
  const VecF4 q = fold<VecF4>(fold<VecF8>(v));
  return (q[0] + q[2]) + (q[1] + q[3]);
}

inline double sum_lanes(VecD v) {
  const VecD2 q = fold<VecD2>(fold<VecD4>(v));
  return q[0] + q[1];
}

// The sums over head_dim a step needs besides the gradients it writes.
template <typename T>
struct StepSums {
  T step, decay, skip;  // dL/d(dt) through u = dt x, dL/d(decay), dL/dD
};

// gB and gC (n) get this head's dL/dB_t and dL/dC_t; or, with acc_B and acc_C given, those are added up in
// vectors across the heads of a group (one sum over lanes per group instead of one per head).
template <typename T, int P>
inline StepSums<T> backward_step_vec(int64_t n, const T* S_t, const T* S_prev, T* G, const T* dy, const T* xt,
                                     T step, T skip, const T* Bt, const T* Ct, T decay, T* gB, T* gC, T* gx,
                                     Vec<T>* acc_B = nullptr, Vec<T>* acc_C = nullptr) {
  constexpr int lanes = kVecBytes / sizeof(T), nv = P / lanes;
  Vec<T> vdy[nv], vx[nv], vu[nv], vgu[nv], vga[nv];
  for (int v = 0; v < nv; ++v) {
    vdy[v] = load_vec(dy + v * lanes);
    vx[v] = load_vec(xt + v * lanes);
    vu[v] = step * vx[v];
    vgu[v] = Vec<T>{};
    vga[v] = Vec<T>{};
  }
  for (int64_t j = 0; j < n; ++j) {
    const T bj = Bt[j], cj = Ct[j];
    const T* Sj = S_t + j * P;
    const T* Pj = S_prev + j * P;
    T* Gj = G + j * P;
    Vec<T> gc{}, gb{};
    for (int v = 0; v < nv; ++v) {
      gc += vdy[v] * load_vec(Sj + v * lanes);               // y_t = S_t^T C_t
      const Vec<T> g = load_vec(Gj + v * lanes) + cj * vdy[v];  // dL/dS_t: from y_t and from S_{t+1}
      gb += g * vu[v];                                       // S_t = a S_{t-1} + B_t u^T
      vgu[v] += bj * g;
      vga[v] += g * load_vec(Pj + v * lanes);
      store_vec(Gj + v * lanes, g * decay);                  // dL/dS_{t-1} through S_t
    }
    if (acc_B) {
      acc_C[j] += gc;
      acc_B[j] += gb;
    } else {
      gC[j] = sum_lanes(gc);
      gB[j] = sum_lanes(gb);
    }
  }
  // x_t enters through u = dt x (dL/dx = dt dL/du) and the skip D x; every sum over head_dim in vectors.
  Vec<T> g_step{}, g_decay{}, g_skip{};
  for (int v = 0; v < nv; ++v) {
    store_vec(gx + v * lanes, vgu[v] * step + skip * vdy[v]);
    g_step += vgu[v] * vx[v];
    g_decay += vga[v];
    g_skip += vdy[v] * vx[v];
  }
  return {sum_lanes(g_step), sum_lanes(g_decay), sum_lanes(g_skip)};
}

// The backward pass of the heads [h_lo, h_lo + hc) of batch element bi, all of group gi, segment by segment from
// the last. dL/dB_t and dL/dC_t of the task's heads, summed, go to gB_out / gC_out + (bi * L + t) * out_stride.
// Summed in vectors across the heads when `grouped` (the vector path only).
template <typename T, int P>
void backward_task(const Dims& d, const T* x, const T* dt, const T* A, const T* B, const T* C, const T* D,
                   const T* checkpoints, const T* grad_y, const T* grad_final, T* grad_x, T* grad_dt,
                   T* gB_out, T* gC_out, int64_t out_stride, T* grad_A, T* grad_D, T* grad_h0, int64_t bi,
                   int64_t gi, int64_t h_lo, int64_t hc) {
  constexpr bool vector_path = P > 0 && (P * sizeof(T)) % kVecBytes == 0;
  const int64_t pn = d.pn(), segments = d.segments(), p = P ? P : d.p, n = d.n;
  std::vector<T> G_buf(hc * pn, T(0)), states(hc * (d.K + 1) * pn), decays(hc * d.K), zeros(p, T(0));
  std::vector<T> u(p), g_u(p), g_a(p), gB_step(n), gC_step(n), g_A(hc, T(0)), g_D(hc, T(0));
  std::vector<Vec<T>> acc_B(vector_path ? n : 0), acc_C(vector_path ? n : 0);
  const bool grouped = vector_path && hc > 1;
  for (int64_t hh = 0; hh < hc; ++hh)
    if (grad_final) load_transposed(d, grad_final + (bi * d.h + h_lo + hh) * pn, G_buf.data() + hh * pn);
  for (int64_t seg = segments - 1; seg >= 0; --seg) {
    const int64_t t0 = seg * d.K, t1 = std::min(d.L, t0 + d.K);
    for (int64_t hh = 0; hh < hc; ++hh) {  // the segment's states, recomputed from its checkpoint
      const int64_t hi = h_lo + hh;
      T* S = states.data() + hh * (d.K + 1) * pn;
      std::memcpy(S, checkpoints + ((bi * d.h + hi) * segments + seg) * pn, pn * sizeof(T));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = bi * d.L + t, k = t - t0;
        if (t + kPrefetchSteps < t1) prefetch_row(x + (row + kPrefetchSteps) * d.xs + hi * d.p, d.p);
        const T step = dt[row * d.h + hi];
        const T decay = static_cast<T>(std::exp(step * A[hi]));
        decays[hh * d.K + k] = decay;
        step_state<T, P>(d, S + (k + 1) * pn, S + k * pn, decay, step, x + row * d.xs + hi * d.p,
                         B + row * d.bcs + gi * n, C + row * d.bcs + gi * n, static_cast<T*>(nullptr), u.data());
      }
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t row = bi * d.L + t, k = t - t0;
      const T* Bt = B + row * d.bcs + gi * n;
      const T* Ct = C + row * d.bcs + gi * n;
      T* gB = gB_out + row * out_stride;
      T* gC = gC_out + row * out_stride;
      if (grouped) {
        std::fill(acc_B.begin(), acc_B.end(), Vec<T>{});
        std::fill(acc_C.begin(), acc_C.end(), Vec<T>{});
      } else {
        std::fill(gB, gB + n, T(0));
        std::fill(gC, gC + n, T(0));
      }
      for (int64_t hh = 0; hh < hc; ++hh) {
        const int64_t hi = h_lo + hh;
        if (t - kPrefetchSteps >= 0 && grad_y) prefetch_row(grad_y + ((row - kPrefetchSteps) * d.h + hi) * d.p, d.p);
        if (t - kPrefetchSteps >= t0) prefetch_row(x + (row - kPrefetchSteps) * d.xs + hi * d.p, d.p);
        const T step = dt[row * d.h + hi], decay = decays[hh * d.K + k], skip = D ? D[hi] : T(0);
        const T* S_prev = states.data() + (hh * (d.K + 1) + k) * pn;
        const T* S_t = S_prev + pn;
        T* G = G_buf.data() + hh * pn;
        const T* xt = x + row * d.xs + hi * d.p;
        const T* dy = grad_y ? grad_y + (row * d.h + hi) * d.p : zeros.data();
        T* gx = grad_x + row * d.gxs + hi * d.p;
        StepSums<T> sums;
        if constexpr (vector_path) {
          sums = backward_step_vec<T, P>(n, S_t, S_prev, G, dy, xt, step, skip, Bt, Ct, decay, gB_step.data(),
                                         gC_step.data(), gx, grouped ? acc_B.data() : nullptr,
                                         grouped ? acc_C.data() : nullptr);
        } else {
          for (int64_t i = 0; i < p; ++i) {
            u[i] = step * xt[i];
            g_u[i] = 0;
            g_a[i] = 0;
          }
          for (int64_t j = 0; j < n; ++j) {
            const T bj = Bt[j], cj = Ct[j];
            const T* Sj = S_t + j * p;
            const T* Pj = S_prev + j * p;
            T* Gj = G + j * p;
            T gc = 0, gb = 0;
#pragma omp simd reduction(+ : gc, gb)
            for (int64_t i = 0; i < p; ++i) {
              gc += dy[i] * Sj[i];               // y_t = S_t^T C_t
              const T g = Gj[i] + cj * dy[i];    // dL/dS_t: from y_t and from S_{t+1}
              gb += g * u[i];                    // S_t = a S_{t-1} + B_t u^T
              g_u[i] += bj * g;
              g_a[i] += g * Pj[i];
              Gj[i] = g * decay;                 // dL/dS_{t-1} through S_t
            }
            gC_step[j] = gc;
            gB_step[j] = gb;
          }
          sums = {T(0), T(0), T(0)};
          for (int64_t i = 0; i < p; ++i) {
            gx[i] = g_u[i] * step + skip * dy[i];  // y_t = ... + D x_t
            sums.step += g_u[i] * xt[i];
            sums.decay += g_a[i];
            sums.skip += dy[i] * xt[i];
          }
        }
        if (!grouped) {
          for (int64_t j = 0; j < n; ++j) {
            gB[j] += gB_step[j];
            gC[j] += gC_step[j];
          }
        }
        // a = exp(dt A): da/d(dt) = a A, da/dA = a dt.
        grad_dt[row * d.h + hi] = sums.step + sums.decay * decay * A[hi];
        g_A[hh] += sums.decay * decay * step;
        g_D[hh] += sums.skip;
      }
      if (grouped) {
        for (int64_t j = 0; j < n; ++j) {
          gB[j] = sum_lanes(acc_B[j]);
          gC[j] = sum_lanes(acc_C[j]);
        }
      }
    }
  }
  for (int64_t hh = 0; hh < hc; ++hh) {
    const int64_t bh = bi * d.h + h_lo + hh;
    grad_A[bh] = g_A[hh];
    if (grad_D) grad_D[bh] = g_D[hh];
    if (grad_h0) store_transposed(d, G_buf.data() + hh * pn, grad_h0 + bh * pn);
  }
}

// grad_y and grad_final may be null (no gradient reached them), and grad_D and grad_h0 (not wanted). grad_B and
// grad_C are per group, (b, L, g, n) with rows gbs values apart (inside the conv output's gradient in a fused
// mixer); grad_A and grad_D per (batch, head), (b, h): the caller sums them over the batch. With enough
// (batch, group) pairs for the threads, one task runs all heads of a group (their B and C gradients summed
// in vectors); otherwise one task per head, each into its own rows, summed over the group's heads after.
template <typename T, int P>
void backward(const Dims& d, const T* x, const T* dt, const T* A, const T* B, const T* C, const T* D,
              const T* checkpoints, const T* grad_y, const T* grad_final, T* grad_x, T* grad_dt, T* grad_B,
              T* grad_C, int64_t gbs, T* grad_A, T* grad_D, T* grad_h0, int threads) {
  const int64_t hg = d.h / d.g, n = d.n;
  if (d.b * d.g >= threads || hg == 1) {
    parallel_for(d.b * d.g, threads, [&](int64_t bg) {
      const int64_t bi = bg / d.g, gi = bg % d.g;
      backward_task<T, P>(d, x, dt, A, B, C, D, checkpoints, grad_y, grad_final, grad_x, grad_dt,
                          grad_B + gi * n, grad_C + gi * n, gbs, grad_A, grad_D, grad_h0, bi, gi, gi * hg, hg);
    });
    return;
  }
  std::vector<T> per_head_B(d.b * d.L * d.h * n), per_head_C(d.b * d.L * d.h * n);
  parallel_for(d.b * d.h, threads, [&](int64_t bh) {
    const int64_t bi = bh / d.h, hi = bh % d.h;
    backward_task<T, P>(d, x, dt, A, B, C, D, checkpoints, grad_y, grad_final, grad_x, grad_dt,
                        per_head_B.data() + hi * n, per_head_C.data() + hi * n, d.h * n, grad_A, grad_D, grad_h0,
                        bi, d.group(hi), hi, 1);
  });
  parallel_for(d.b * d.L, threads, [&](int64_t row) {
    for (int64_t gi = 0; gi < d.g; ++gi) {
      T* gB = grad_B + row * gbs + gi * n;
      T* gC = grad_C + row * gbs + gi * n;
      std::fill(gB, gB + n, T(0));
      std::fill(gC, gC + n, T(0));
      for (int64_t hi = gi * hg; hi < (gi + 1) * hg; ++hi) {
        const T* src_B = per_head_B.data() + (row * d.h + hi) * n;
        const T* src_C = per_head_C.data() + (row * d.h + hi) * n;
        for (int64_t j = 0; j < n; ++j) {
          gB[j] += src_B[j];
          gC[j] += src_C[j];
        }
      }
    }
  });
}


// exp for float that the compiler can vectorise (std::exp is a scalar library call): exp(v) = 2^k exp(r) with
// k = round(v / ln 2) and |r| <= ln(2) / 2, ln 2 split in two parts so that r is exact, and exp(r) from a
// degree-6 polynomial (the classic Cephes expf coefficients); about 1 ulp from std::exp over the clamped range.
inline float exp_vec(float v) {
  v = v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v);
  // Round to nearest by adding and removing 1.5 * 2^23 (std::floor does not vectorise without -ffast-math).
  const float k = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (v - k * 0.693359375f) + k * 2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  q = q * r * r + r + 1.0f;
  return q * __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);  // 2^k
}

inline float sigmoid(float v) { return 1.0f / (1.0f + exp_vec(-v)); }
inline double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// The conv's sizes: x has L rows of c channels per batch element, xs values apart (c when contiguous, more
// when x is a slice of a wider projection); k taps.
struct ConvDims {
  int64_t L, c, k, xs;
};

// Row e of the extended input [left; x] of batch bi (e < k - 1 reads left); null for a left row when there is
// no left context (zeros).
template <typename T>
inline const T* ext_row(const ConvDims& d, const T* x, const T* left, int64_t bi, int64_t e) {
  if (e >= d.k - 1) return x + (bi * d.L + e - (d.k - 1)) * d.xs;
  return left ? left + (bi * (d.k - 1) + e) * d.c : nullptr;
}

// pre_t = bias + sum_j w_j * e_{t+j} for one row t of batch bi.
template <typename T>
inline void conv_row(const ConvDims& d, const T* x, const T* w, const T* bias, const T* left, int64_t bi,
                     int64_t t, T* pre) {
  const int64_t c = d.c;
  if (bias) std::memcpy(pre, bias, c * sizeof(T));
  else std::fill(pre, pre + c, T(0));
  for (int64_t j = 0; j < d.k; ++j) {
    const T* src = ext_row(d, x, left, bi, t + j);
    if (!src) continue;
    const T* wj = w + j * c;
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) pre[ch] += wj[ch] * src[ch];
  }
}

template <typename T>
void conv_forward(int64_t b, const ConvDims& d, const T* x, const T* w, const T* bias, const T* left, int silu,
                  T* out, int threads) {
  const int64_t L = d.L, c = d.c;
  parallel_for(b * L, threads, [&](int64_t r) {
    T* o = out + r * c;
    conv_row(d, x, w, bias, left, r / L, r % L, o);
    if (silu) {
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) o[ch] = o[ch] * sigmoid(o[ch]);
    }
  });
}

// grad_w (k, c) and grad_bias (c) are summed here over the batch (per-thread partial sums, then added up).
// grad_x has rows gxs values apart; grad_left is null when left is (no left context).
template <typename T>
void conv_backward(int64_t b, const ConvDims& d, int64_t gxs, const T* x, const T* w, const T* bias,
                   const T* left, int silu, const T* grad_out, T* grad_x, T* grad_w, T* grad_bias, T* grad_left,
                   int threads) {
  const int64_t L = d.L, c = d.c, k = d.k;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, b));
  std::vector<T> partial(workers * (k + 1) * c, T(0));
  parallel_for(workers, static_cast<int>(workers), [&](int64_t wi) {
    T* pw = partial.data() + wi * (k + 1) * c;  // k rows of grad_w, then grad_bias
    std::vector<T> g_pre(L * c);
    for (int64_t bi = b * wi / workers; bi < b * (wi + 1) / workers; ++bi) {
      // dL/d(pre-activation) for every row of this batch element.
      for (int64_t t = 0; t < L; ++t) {
        T* g = g_pre.data() + t * c;
        const T* go = grad_out + (bi * L + t) * c;
        if (silu) {
          conv_row(d, x, w, bias, left, bi, t, g);
#pragma omp simd
          for (int64_t ch = 0; ch < c; ++ch) {
            const T s = sigmoid(g[ch]);
            g[ch] = go[ch] * s * (T(1) + g[ch] * (T(1) - s));
          }
        } else {
          std::memcpy(g, go, c * sizeof(T));
        }
        T* gb = pw + k * c;
#pragma omp simd
        for (int64_t ch = 0; ch < c; ++ch) gb[ch] += g[ch];
      }
      // Row e of [left; x] feeds output t = e - j through tap j.
      for (int64_t e = left ? 0 : k - 1; e < L + k - 1; ++e) {
        T* gx = e < k - 1 ? grad_left + (bi * (k - 1) + e) * c : grad_x + (bi * L + e - (k - 1)) * gxs;
        const T* src = ext_row(d, x, left, bi, e);
        std::fill(gx, gx + c, T(0));
        for (int64_t j = 0; j < k; ++j) {
          const int64_t t = e - j;
          if (t < 0 || t >= L) continue;
          const T* g = g_pre.data() + t * c;
          const T* wj = w + j * c;
          T* gwj = pw + j * c;
#pragma omp simd
          for (int64_t ch = 0; ch < c; ++ch) {
            gx[ch] += wj[ch] * g[ch];
            gwj[ch] += g[ch] * src[ch];
          }
        }
      }
    }
  });
  std::fill(grad_w, grad_w + k * c, T(0));
  if (grad_bias) std::fill(grad_bias, grad_bias + c, T(0));
  for (int64_t wi = 0; wi < workers; ++wi) {
    const T* pw = partial.data() + wi * (k + 1) * c;
    for (int64_t i = 0; i < k * c; ++i) grad_w[i] += pw[i];
    if (grad_bias)
      for (int64_t ch = 0; ch < c; ++ch) grad_bias[ch] += pw[k * c + ch];
  }
}


// sum_i a_i b_i (c_i): two vector accumulators. A plain loop with a scalar `+=` (even under `omp simd
// reduction`) may be left as one serial chain of fused multiply-adds, four cycles an element.
template <typename T>
inline Vec<T> product_vec(const T* a, const T* b, const T* c, int64_t i) {
  const Vec<T> ab = load_vec(a + i) * load_vec(b + i);
  return c ? ab * load_vec(c + i) : ab;
}

template <typename T>
inline T dot(const T* a, const T* b, const T* c, int64_t n) {
  constexpr int64_t lanes = kVecBytes / sizeof(T);
  Vec<T> acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 2 * lanes <= n; i += 2 * lanes) {
    acc0 += product_vec(a, b, c, i);
    acc1 += product_vec(a, b, c, i + lanes);
  }
  for (; i + lanes <= n; i += lanes) acc0 += product_vec(a, b, c, i);
  T s = sum_lanes(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i] * (c ? c[i] : T(1));
  return s;
}

template <typename T>
void rmsnorm_forward(int64_t rows, int64_t d, int64_t gs, const T* x, int64_t x_stride, const T* z,
                     int64_t z_stride, const T* w, T eps, T* out, T* rstd, int threads) {
  const int64_t groups = d / gs;
  parallel_for(rows, threads, [&](int64_t r) {
    const T* xr = x + r * x_stride;
    const T* zr = z ? z + r * z_stride : nullptr;
    T* o = out + r * d;
    if (zr) {
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] = xr[i] * zr[i] * sigmoid(zr[i]);
    } else {
      std::memcpy(o, xr, d * sizeof(T));
    }
    for (int64_t k = 0; k < groups; ++k) {
      T* og = o + k * gs;
      const T inv = T(1) / std::sqrt(dot<T>(og, og, nullptr, gs) / T(gs) + eps);
      rstd[r * groups + k] = inv;
      const T* wg = w + k * gs;
#pragma omp simd
      for (int64_t i = 0; i < gs; ++i) og[i] = wg[i] * (og[i] * inv);
    }
  });
}

// grad_z (rows of grad_z_stride, e.g. inside the gradient of a wider projection) may be null (no gate);
// grad_x is contiguous; grad_w (d) is summed here over the rows (per-thread partial sums). The gated input
// h = x * SiLU(z) and its sigmoid are recomputed once per row into local buffers.
template <typename T>
void rmsnorm_backward(int64_t rows, int64_t d, int64_t gs, const T* x, int64_t x_stride, const T* z,
                      int64_t z_stride, const T* w, const T* rstd, const T* grad_out, T* grad_x, T* grad_z,
                      int64_t grad_z_stride, T* grad_w, int threads) {
  const int64_t groups = d / gs;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, rows));
  std::vector<T> partial(workers * d, T(0));
  parallel_for(workers, static_cast<int>(workers), [&](int64_t wi) {
    T* __restrict gw = partial.data() + wi * d;
    std::vector<T> h_buf(d), s_buf(d);
    T* __restrict h = h_buf.data();
    T* __restrict sg = s_buf.data();
    for (int64_t r = rows * wi / workers; r < rows * (wi + 1) / workers; ++r) {
      const T* __restrict xr = x + r * x_stride;
      const T* __restrict zr = z ? z + r * z_stride : nullptr;
      const T* __restrict go = grad_out + r * d;
      T* __restrict gx = grad_x + r * d;
      if (zr) {
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) {
          const T s = sigmoid(zr[i]);
          sg[i] = s;
          h[i] = xr[i] * zr[i] * s;
        }
      }
      const T* __restrict hv = zr ? h : xr;
      for (int64_t k = 0; k < groups; ++k) {
        // out = w h inv with inv = (mean(h^2) + eps)^(-1/2):
        // dL/dh_i = inv w_i go_i - h_i inv^3 / gs * sum_j w_j go_j h_j.
        const T inv = rstd[r * groups + k];
        const int64_t lo = k * gs, hi = lo + gs;
        const T c = dot(go + lo, w + lo, hv + lo, gs) * inv * inv * inv / T(gs);
        if (zr) {
          T* __restrict gz = grad_z + r * grad_z_stride;
#pragma omp simd
          for (int64_t i = lo; i < hi; ++i) {
            gw[i] += go[i] * hv[i] * inv;
            const T gh = inv * go[i] * w[i] - hv[i] * c;
            const T s = sg[i];
            gx[i] = gh * zr[i] * s;
            gz[i] = gh * xr[i] * s * (T(1) + zr[i] * (T(1) - s));
          }
        } else {
#pragma omp simd
          for (int64_t i = lo; i < hi; ++i) {
            gw[i] += go[i] * hv[i] * inv;
            gx[i] = inv * go[i] * w[i] - hv[i] * c;
          }
        }
      }
    }
  });
  std::fill(grad_w, grad_w + d, T(0));
  for (int64_t wi = 0; wi < workers; ++wi)
    for (int64_t i = 0; i < d; ++i) grad_w[i] += partial[wi * d + i];
}


template <typename T>
inline T exp_any(T v) {
  if constexpr (std::is_same_v<T, float>) return exp_vec(v);
  else return std::exp(v);
}

// The forward pass runs kV channels side by side (one vector register of each quantity): every operation
// of a step is then a vertical vector operation, with no sum across a vector's lanes, and the n states of
// the block stay in registers. A task copies its channels' rows into time-major local buffers first.
template <typename T>
void s6_forward(int64_t b, int64_t d, int64_t L, int64_t n, int64_t K, const T* u, const T* delta, const T* A,
                const T* B, const T* C, const T* h0, T* y, T* final_state, T* checkpoints, int threads) {
  constexpr int64_t kV = kVecBytes / sizeof(T);
  const int64_t segments = (L + K - 1) / K, blocks = (d + kV - 1) / kV;
  parallel_for(b * blocks, threads, [&](int64_t task) {
    const int64_t bi = task / blocks, d0 = (task % blocks) * kV, vb = std::min(kV, d - d0);
    // Lanes past the last channel hold zeros: u = delta = 0 leaves their state at zero, and nothing of
    // them is written back.
    std::vector<T> U(L * kV, T(0)), DL(L * kV, T(0)), Y(L * kV), AT(n * kV, T(0)), S(n * kV, T(0));
    for (int64_t v = 0; v < vb; ++v) {
      const int64_t row = bi * d + d0 + v;
      for (int64_t t = 0; t < L; ++t) {
        U[t * kV + v] = u[row * L + t];
        DL[t * kV + v] = delta[row * L + t];
      }
      for (int64_t j = 0; j < n; ++j) {
        AT[j * kV + v] = A[(d0 + v) * n + j];
        S[j * kV + v] = h0[row * n + j];
      }
    }
    for (int64_t t = 0; t < L; ++t) {
      if (checkpoints && t % K == 0)
        for (int64_t v = 0; v < vb; ++v)
          for (int64_t j = 0; j < n; ++j)
            checkpoints[(((bi * d + d0 + v) * segments) + t / K) * n + j] = S[j * kV + v];
      const T* dl = DL.data() + t * kV;
      const T* ut = U.data() + t * kV;
      const T* Bt = B + (bi * L + t) * n;
      const T* Ct = C + (bi * L + t) * n;
      T acc[kV], x[kV];
#pragma omp simd
      for (int64_t v = 0; v < kV; ++v) {
        acc[v] = 0;
        x[v] = dl[v] * ut[v];
      }
      for (int64_t j = 0; j < n; ++j) {
        const T bj = Bt[j], cj = Ct[j];
        T* Sj = S.data() + j * kV;
        const T* Aj = AT.data() + j * kV;
#pragma omp simd
        for (int64_t v = 0; v < kV; ++v) {
          const T s = exp_any(dl[v] * Aj[v]) * Sj[v] + x[v] * bj;
          Sj[v] = s;
          acc[v] += s * cj;
        }
      }
      std::memcpy(Y.data() + t * kV, acc, sizeof(acc));
    }
    for (int64_t v = 0; v < vb; ++v) {
      const int64_t row = bi * d + d0 + v;
      for (int64_t t = 0; t < L; ++t) y[row * L + t] = Y[t * kV + v];
      for (int64_t j = 0; j < n; ++j) final_state[row * n + j] = S[j * kV + v];
    }
  });
}

// grad_y, grad_final may be null. Outputs: grad_u, grad_delta (b, d, L); grad_A per (batch, channel),
// (b, d, n); grad_B and grad_C per worker, (workers, b, L, n), each worker summing over its channels (the
// caller adds the workers up); grad_h0 (b, d, n). `workers` must be min(threads, b * d), at least 1.
template <typename T>
void s6_backward(int64_t b, int64_t d, int64_t L, int64_t n, int64_t K, const T* u, const T* delta,
                 const T* A, const T* B, const T* C, const T* checkpoints, const T* grad_y, const T* grad_final,
                 T* grad_u, T* grad_delta, T* grad_A, T* grad_B, T* grad_C, T* grad_h0, int threads) {
  const int64_t segments = (L + K - 1) / K;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, b * d));
  std::fill(grad_B, grad_B + workers * b * L * n, T(0));
  std::fill(grad_C, grad_C + workers * b * L * n, T(0));
  parallel_for(workers, static_cast<int>(workers), [&](int64_t wi) {
    T* gB_w = grad_B + wi * b * L * n;
    T* gC_w = grad_C + wi * b * L * n;
    std::vector<T> G(n), states((K + 1) * n), decays(K * n), g(n);
    for (int64_t bd = b * d * wi / workers; bd < b * d * (wi + 1) / workers; ++bd) {
      const int64_t bi = bd / d, di = bd % d;
      const T* Ad = A + di * n;
      const T* ur = u + bd * L;
      const T* dr = delta + bd * L;
      if (grad_final) std::memcpy(G.data(), grad_final + bd * n, n * sizeof(T));
      else std::fill(G.begin(), G.end(), T(0));
      std::vector<T> g_A(n, T(0));
      for (int64_t seg = segments - 1; seg >= 0; --seg) {
        const int64_t t0 = seg * K, t1 = std::min(L, t0 + K);
        std::memcpy(states.data(), checkpoints + (bd * segments + seg) * n, n * sizeof(T));
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t k = t - t0;
          const T dl = dr[t], x = dl * ur[t];
          const T* Bt = B + (bi * L + t) * n;
          const T* prev = states.data() + k * n;
          T* next = states.data() + (k + 1) * n;
          T* a = decays.data() + k * n;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            a[j] = exp_any(dl * Ad[j]);
            next[j] = a[j] * prev[j] + x * Bt[j];
          }
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t k = t - t0;
          const T dl = dr[t], ut = ur[t], x = dl * ut;
          const T dy = grad_y ? grad_y[bd * L + t] : T(0);
          const T* Bt = B + (bi * L + t) * n;
          const T* Ct = C + (bi * L + t) * n;
          const T* S_t = states.data() + (k + 1) * n;
          const T* S_prev = states.data() + k * n;
          const T* a = decays.data() + k * n;
          T* gB = gB_w + (bi * L + t) * n;
          T* gC = gC_w + (bi * L + t) * n;
          T g_x = 0, g_dlA = 0;
#pragma omp simd reduction(+ : g_x, g_dlA)
          for (int64_t j = 0; j < n; ++j) {
            gC[j] += dy * S_t[j];                   // y_t = S_t . C_t
            const T gj = G[j] + dy * Ct[j];         // dL/dS_t
            gB[j] += gj * x;                        // S_t = a S_{t-1} + x B_t, x = delta u
            g_x += gj * Bt[j];
            const T g_exp = gj * S_prev[j] * a[j];  // dL/d(delta A_j)
            g_dlA += g_exp * Ad[j];
            g_A[j] += g_exp * dl;
            G[j] = gj * a[j];                       // dL/dS_{t-1} through S_t
          }
          grad_u[bd * L + t] = g_x * dl;
          grad_delta[bd * L + t] = g_x * ut + g_dlA;
        }
      }
      std::memcpy(grad_A + bd * n, g_A.data(), n * sizeof(T));
      std::memcpy(grad_h0 + bd * n, G.data(), n * sizeof(T));
    }
  });
}

}  // namespace

extern "C" {

// Head dims 16, 32 and 64 get kernels with the size fixed at compile time; any other size the general one.
#define VLM_SSD_DISPATCH(CALL, T)                                                                            \
  switch (p) {                                                                                               \
    case 16: CALL(T, 16); break;                                                                             \
    case 32: CALL(T, 32); break;                                                                             \
    case 64: CALL(T, 64); break;                                                                             \
    default: CALL(T, 0);                                                                                     \
  }
#define VLM_SSD_FORWARD(T, P) forward<T, P>(d, x, dt, A, B, C, D, h0, y, final_state, checkpoints, threads)
#define VLM_SSD_BACKWARD(T, P)                                                                               \
  backward<T, P>(d, x, dt, A, B, C, D, checkpoints, grad_y, grad_final, grad_x, grad_dt, grad_B, grad_C,     \
                 gbs, grad_A, grad_D, grad_h0, threads)

// D, h0 and final_state (forward) and D, grad_y, grad_final, grad_D and grad_h0 (backward) may be null; gbs is
// the row stride of grad_B and grad_C, (b, L, g, n).
#define VLM_SSD_ENTRY_POINTS(T, SUFFIX)                                                                      \
  int vlm_ssd_forward_##SUFFIX(int64_t b, int64_t L, int64_t h, int64_t p, int64_t g, int64_t n, int64_t K,  \
                               int64_t xs, int64_t bcs, const T* x, const T* dt, const T* A, const T* B,     \
                               const T* C, const T* D, const T* h0, T* y, T* final_state, T* checkpoints,    \
                               int threads) {                                                                \
    const Dims d{b, L, h, p, g, n, K, xs, bcs, h * p};                                                       \
    VLM_SSD_DISPATCH(VLM_SSD_FORWARD, T)                                                                     \
    return 0;                                                                                                \
  }                                                                                                          \
  int vlm_ssd_backward_##SUFFIX(int64_t b, int64_t L, int64_t h, int64_t p, int64_t g, int64_t n, int64_t K, \
                                int64_t xs, int64_t bcs, int64_t gxs, int64_t gbs, const T* x, const T* dt,  \
                                const T* A, const T* B, const T* C, const T* D, const T* checkpoints,        \
                                const T* grad_y, const T* grad_final, T* grad_x, T* grad_dt, T* grad_B,      \
                                T* grad_C, T* grad_A, T* grad_D, T* grad_h0, int threads) {                  \
    const Dims d{b, L, h, p, g, n, K, xs, bcs, gxs};                                                         \
    VLM_SSD_DISPATCH(VLM_SSD_BACKWARD, T)                                                                    \
    return 0;                                                                                                \
  }

VLM_SSD_ENTRY_POINTS(float, f32)
VLM_SSD_ENTRY_POINTS(double, f64)

}  // extern "C"

extern "C" {

// x has rows xs values apart, grad_x gxs; left and grad_left may be null (no left context: zeros).
#define VLM_CONV_ENTRY_POINTS(T, SUFFIX)                                                                     \
  int vlm_conv_forward_##SUFFIX(int64_t b, int64_t L, int64_t c, int64_t k, int64_t xs, const T* x,          \
                                const T* w, const T* bias, const T* left, int silu, T* out, int threads) {   \
    conv_forward<T>(b, ConvDims{L, c, k, xs}, x, w, bias, left, silu, out, threads);                         \
    return 0;                                                                                                \
  }                                                                                                          \
  int vlm_conv_backward_##SUFFIX(int64_t b, int64_t L, int64_t c, int64_t k, int64_t xs, int64_t gxs,        \
                                 const T* x, const T* w, const T* bias, const T* left, int silu,             \
                                 const T* grad_out, T* grad_x, T* grad_w, T* grad_bias, T* grad_left,        \
                                 int threads) {                                                              \
    conv_backward<T>(b, ConvDims{L, c, k, xs}, gxs, x, w, bias, left, silu, grad_out, grad_x, grad_w,        \
                     grad_bias, grad_left, threads);                                                         \
    return 0;                                                                                                \
  }

VLM_CONV_ENTRY_POINTS(float, f32)
VLM_CONV_ENTRY_POINTS(double, f64)

}  // extern "C"

extern "C" {

#define VLM_NORM_ENTRY_POINTS(T, SUFFIX)                                                                     \
  int vlm_rmsnorm_forward_##SUFFIX(int64_t rows, int64_t d, int64_t gs, const T* x, int64_t x_stride,        \
                                   const T* z, int64_t z_stride, const T* w, double eps, T* out, T* rstd,    \
                                   int threads) {                                                            \
    rmsnorm_forward<T>(rows, d, gs, x, x_stride, z, z_stride, w, static_cast<T>(eps), out, rstd, threads);   \
    return 0;                                                                                                \
  }                                                                                                          \
  int vlm_rmsnorm_backward_##SUFFIX(int64_t rows, int64_t d, int64_t gs, const T* x, int64_t x_stride,       \
                                    const T* z, int64_t z_stride, const T* w, const T* rstd,                 \
                                    const T* grad_out, T* grad_x, T* grad_z, int64_t grad_z_stride,          \
                                    T* grad_w, int threads) {                                                \
    rmsnorm_backward<T>(rows, d, gs, x, x_stride, z, z_stride, w, rstd, grad_out, grad_x, grad_z,            \
                        grad_z_stride, grad_w, threads);                                                     \
    return 0;                                                                                                \
  }

VLM_NORM_ENTRY_POINTS(float, f32)
VLM_NORM_ENTRY_POINTS(double, f64)

}  // extern "C"

extern "C" {

#define VLM_S6_ENTRY_POINTS(T, SUFFIX)                                                                       \
  int vlm_s6_forward_##SUFFIX(int64_t b, int64_t d, int64_t L, int64_t n, int64_t K, const T* u,             \
                              const T* delta, const T* A, const T* B, const T* C, const T* h0, T* y,         \
                              T* final_state, T* checkpoints, int threads) {                                 \
    s6_forward<T>(b, d, L, n, K, u, delta, A, B, C, h0, y, final_state, checkpoints, threads);               \
    return 0;                                                                                                \
  }                                                                                                          \
  int vlm_s6_backward_##SUFFIX(int64_t b, int64_t d, int64_t L, int64_t n, int64_t K, const T* u,            \
                               const T* delta, const T* A, const T* B, const T* C, const T* checkpoints,     \
                               const T* grad_y, const T* grad_final, T* grad_u, T* grad_delta, T* grad_A,    \
                               T* grad_B, T* grad_C, T* grad_h0, int threads) {                              \
    s6_backward<T>(b, d, L, n, K, u, delta, A, B, C, checkpoints, grad_y, grad_final, grad_u, grad_delta,    \
                   grad_A, grad_B, grad_C, grad_h0, threads);                                                \
    return 0;                                                                                                \
  }

VLM_S6_ENTRY_POINTS(float, f32)
VLM_S6_ENTRY_POINTS(double, f64)

}  // extern "C"
