// Fused SeT on the CPU: one (batch, head) slice at a time, its n x m kernel
// in a per-thread buffer (in cache for small slices; for large ones, T + 2
// sweeps from memory forward: build, T - 1 Sinkhorn sweeps, the last row
// scaling fused with the first aggregation, the second aggregation), or,
// for huge ones, rebuilt block by block in every sweep (KernelRows).
//
// The reference (mmsetformer/ops/set_attention.py, `_SeTFunction`) runs each
// pass over the kernels of all slices before the next, so a kernel larger
// than the cache streams from memory ~10 times forward and again backward,
// and the backward keeps every kernel alive from the forward.  Here a
// thread builds a slice's kernel (one GEMM + one exp pass), runs all of
// Sinkhorn on it (one fused row sweep per iteration: the row product for
// the row scaling, and that row's share of the column sums while it is
// hot), both aggregations (two GEMMs), and moves on; the backward rebuilds
// the kernel the same way instead of keeping it.  Same function, same exact
// gradients of the T unrolled iterations: the tests hold it against the
// reference and a dense float64 one.
//
// Layout: q and v (B, h, n, d) with rows of unit stride (views of the
// layer's projection: no copy), tok (n, k) the tokens' LPE features, rf
// (h, m, d + k) with slice s = b h + head using head s % h; S = B h.  The
// kernel builds each slice's query features qf (n, dp = d + k) itself, as
// _features in set_attention.py does: [q / (|q| + delta) / eps, tok].
// y is written, and its gradient read, as (B, h, n, d) views of (B, n, h,
// d) tensors (heads_last in set_attention.py: the layer's own layout).
// Row-major throughout.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

extern "C" {
// Fortran BLAS, exported by libtorch_cpu (MKL on x86, OpenBLAS elsewhere).
void sgemm_(const char *, const char *, const int *, const int *,
            const int *, const float *, const float *, const int *,
            const float *, const int *, const float *, float *, const int *);
void dgemm_(const char *, const char *, const int *, const int *,
            const int *, const double *, const double *, const int *,
            const double *, const int *, const double *, double *,
            const int *);
}

namespace {

using at::vec::Vectorized;

// As LOG_KERNEL_FLOOR in set_attention.py: entries of log K below the row
// max minus this are clamped (and pass no gradient).
constexpr double kLogFloor = 30.0;

inline void blas_gemm(char ta, char tb, int m, int n, int k, float alpha,
                      const float *a, int lda, const float *b, int ldb,
                      float beta, float *c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas_gemm(char ta, char tb, int m, int n, int k, double alpha,
                      const double *a, int lda, const double *b, int ldb,
                      double beta, double *c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Row-major C (M x N) = alpha op(A) op(B) + beta C, op(A): M x K.
// (Row-major C = A B is column-major C^T = B^T A^T.)
template <typename T>
void mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha,
        const T *A, int64_t lda, const T *B, int64_t ldb, T beta, T *C,
        int64_t ldc) {
  if (M == 0 || N == 0) return;
  blas_gemm(tb ? 'T' : 'N', ta ? 'T' : 'N', static_cast<int>(N),
            static_cast<int>(M), static_cast<int>(K), alpha, B,
            static_cast<int>(ldb), A, static_cast<int>(lda), beta, C,
            static_cast<int>(ldc));
}

template <typename T>
inline T safe_div(T num, T den) {
  // num / den, 0 where den underflowed (see _safe_div in set_attention.py)
  return den > std::numeric_limits<T>::min() ? num / den : T(0);
}

template <typename T>
inline T safe_div_grad(T g, T out, T den) {
  return den > std::numeric_limits<T>::min() ? -g * out / den : T(0);
}

template <typename T>
inline Vectorized<T> vexp(const Vectorized<T> &x) {
  return x.exp();
}
template <>
inline Vectorized<float> vexp(const Vectorized<float> &x) {
  // arguments lie in [-30, 0]: the polynomial exp is exact enough there
  return x.exp_u20();
}

template <typename T>
inline T hsum(const Vectorized<T> &x) {
  T lanes[Vectorized<T>::size()];
  x.store(lanes);
  T sum = 0;
  for (int64_t l = 0; l < Vectorized<T>::size(); ++l) sum += lanes[l];
  return sum;
}

template <typename T>
T dot(const T *x, const T *y, int64_t m) {
  using V = Vectorized<T>;
  V acc0(T(0)), acc1(T(0));
  int64_t j = 0;
  for (; j + 2 * V::size() <= m; j += 2 * V::size()) {
    acc0 = at::vec::fmadd(V::loadu(x + j), V::loadu(y + j), acc0);
    acc1 = at::vec::fmadd(V::loadu(x + j + V::size()),
                          V::loadu(y + j + V::size()), acc1);
  }
  for (; j < m; j += V::size()) {  // masked loads fill with zeros
    const int64_t c = std::min<int64_t>(V::size(), m - j);
    acc0 = at::vec::fmadd(V::loadu(x + j, c), V::loadu(y + j, c), acc0);
  }
  return hsum(acc0 + acc1);
}

// y += a * x
template <typename T>
void axpy(T a, const T *x, T *y, int64_t m) {
  using V = Vectorized<T>;
  const V va(a);
  int64_t j = 0;
  for (; j + V::size() <= m; j += V::size())
    at::vec::fmadd(va, V::loadu(x + j), V::loadu(y + j)).store(y + j);
  if (j < m) {
    const int64_t c = m - j;
    at::vec::fmadd(va, V::loadu(x + j, c), V::loadu(y + j, c)).store(y + j, c);
  }
}

// A sweep over a kept kernel larger than the cache reads it from DRAM;
// with the hardware prefetcher alone the row products ran at about half of
// the memory's bandwidth, so each row asks for one a few rows ahead.
constexpr int64_t kPrefetchRows = 2;
template <typename T>
inline void prefetch_row(const T *row, int64_t m) {
#if defined(__GNUC__)  // GCC and Clang; elsewhere the hardware's alone
  const char *p = reinterpret_cast<const char *>(row);
  for (int64_t b = 0; b < m * static_cast<int64_t>(sizeof(T)); b += 64)
    __builtin_prefetch(p + b);  // a hint: past the buffer's end is harmless
#endif
}

// Rows of K per GEMM call, in the build and the aggregations: 256 KB blocks
// stay in L2 for the exp pass and the sweep fused with the first
// aggregation, and keep the GEMM calls large enough to run at speed.
template <typename T>
int64_t build_rows(int64_t m) {
  return std::max<int64_t>(8, (int64_t(1) << 18) / (m * sizeof(T)));
}

// The passes over the rows of one slice.  When slices run one per thread
// (the usual case) a pass is one chunk of all rows; when there are fewer
// slices than threads, a slice gets the whole pool and each pass splits its
// rows into one chunk per thread.  Column sums then go to per-chunk
// partials, added in chunk order afterwards (deterministic for a given
// thread count).
struct Rows {
  int64_t n, chunks;
  explicit Rows(int64_t n_) : n(n_) {
    chunks = at::in_parallel_region()
                 ? 1
                 : std::max<int64_t>(1, std::min<int64_t>(
                                            at::get_num_threads(), n / 64));
  }
  // fn(chunk, i0, i1) for every chunk of rows
  template <typename F>
  void run(F &&fn) const {
    if (chunks == 1) return fn(int64_t(0), int64_t(0), n);
    const int64_t per = (n + chunks - 1) / chunks;
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        fn(c, c * per, std::min(n, (c + 1) * per));
    });
  }
  // chunk c's partial of a len-long sum into out: out itself for chunk 0
  template <typename T>
  T *partial(T *out, T *scratch, int64_t c, int64_t len) const {
    return c == 0 ? out : scratch + (c - 1) * len;
  }
  template <typename T>
  void reduce(T *out, const T *scratch, int64_t len) const {
    for (int64_t c = 1; c < chunks; ++c)
      for (int64_t j = 0; j < len; ++j) out[j] += scratch[(c - 1) * len + j];
  }
};

// Rows [i0, i0 + nb) of K into Kb (nb x m): exp(max(l - rowmax, -floor))
// for the logits l = qf rf^T of those rows.  fresh: the row maxima are
// computed into mx (and the row sums into sum, if given); else mx holds
// them from an earlier build of the same block (the same GEMM on the same
// rows, so the same entries up to the GEMM's determinism).
template <typename T>
void kernel_block(const T *qf, const T *rf, int64_t m, int64_t dp,
                  int64_t nb, T *Kb, T *mx, bool fresh, T *sum) {
  using V = Vectorized<T>;
  const V lo(static_cast<T>(-kLogFloor));
  mm<T>(false, true, nb, m, dp, T(1), qf, dp, rf, dp, T(0), Kb, m);
  for (int64_t i = 0; i < nb; ++i) {
    T *row = Kb + i * m;
    int64_t j = 0;
    if (fresh) {
      // a NaN may slip past clamp_min here: it reaches K (and the
      // output) through the exp pass all the same
      T top = -std::numeric_limits<T>::infinity();
      if (m >= V::size()) {
        V vmx = V::loadu(row);
        for (j = V::size(); j + V::size() <= m; j += V::size())
          vmx = at::vec::clamp_min(vmx, V::loadu(row + j));
        T lanes[V::size()];
        vmx.store(lanes);
        for (int64_t l = 0; l < V::size(); ++l) top = std::max(top, lanes[l]);
      }
      for (; j < m; ++j) top = std::max(top, row[j]);
      mx[i] = top;
    }
    const V vmx(mx[i]);
    V acc(T(0));
    for (j = 0; j + V::size() <= m; j += V::size()) {
      V e = vexp(at::vec::clamp_min(V::loadu(row + j) - vmx, lo));
      e.store(row + j);
      acc = acc + e;
    }
    T total = hsum(acc);
    if (j < m) {
      const int64_t c = m - j;
      T lanes[V::size()];
      vexp(at::vec::clamp_min(V::loadu(row + j, c) - vmx, lo)).store(lanes);
      for (int64_t l = 0; l < c; ++l) {
        row[j + l] = lanes[l];
        total += lanes[l];
      }
    }
    if (sum) sum[i] = total;
  }
}

// Rows of one slice of a (B, h, n, d) tensor whose rows have unit stride
// (E = const T to read them, T to write them).
template <typename T, typename E = const T>
struct RowsOf {
  E *p;
  int64_t stride;  // between consecutive rows
  E *operator[](int64_t i) const { return p + i * stride; }
};

// Rows [i0, i1) of the query features qf (dp = d + k columns, row i at
// qf + i dp): [q_i / (|q_i| + delta) / eps, tok_i].
template <typename T>
void query_features(RowsOf<T> q, const T *tok, int64_t d, int64_t k, T eps,
                    T delta, int64_t i0, int64_t i1, T *qf) {
  for (int64_t i = i0; i < i1; ++i) {
    const T *x = q[i];
    T *f = qf + i * (d + k);
    const T den = std::sqrt(dot(x, x, d)) + delta;
    for (int64_t j = 0; j < d; ++j) f[j] = x[j] / den / eps;
    std::copy(tok + i * k, tok + (i + 1) * k, f + d);
  }
}

// dL/dq of rows [i0, i1) into gq (row i at gq + i d) from dL/dqf's first d
// columns (row i at g + (i - i0) dp): through qf = q / (|q| + delta) / eps,
// gq = (g - (g.q) q / (|q| (|q| + delta))) / ((|q| + delta) eps), the
// second term 0 at q = 0 (as autograd's norm backward).
template <typename T>
void query_grads(RowsOf<T> q, const T *g, int64_t dp, int64_t d, T eps,
                 T delta, int64_t i0, int64_t i1, T *gq) {
  for (int64_t i = i0; i < i1; ++i) {
    const T *x = q[i], *gi = g + (i - i0) * dp;
    T *o = gq + i * d;
    const T nrm = std::sqrt(dot(x, x, d)), den = nrm + delta;
    const T c = nrm > 0 ? dot(gi, x, d) / (nrm * den) : T(0);
    for (int64_t j = 0; j < d; ++j) o[j] = (gi[j] - c * x[j]) / den / eps;
  }
}

// Where a pass over the kernel reads its rows from.  Kept: the whole n x m
// kernel, built by the first pass and read by the others.  Streamed: no
// n x m buffer; every pass rebuilds each block of rows in a small buffer
// of its chunk, from the row maxima of the first pass.  Rebuilding a block
// (one GEMM with dp-wide rows and an exp) costs about what reading a kept
// one from DRAM does and more than reading it from cache, so streaming is
// for memory (O(n) per slice): slices whose kernel exceeds `stream_bytes`.
template <typename T>
struct KernelRows {
  const T *qf, *rf;
  int64_t m, dp, rows;  // rows: per block (a cache-sized block)
  T *K;                 // n x m when kept, else null
  T *mx;                // n row maxima, from the first pass
  T *buf;               // chunks x rows x m when streamed

  // fn(i0, nb, Kb) for every block [i0, i0 + nb) of rows [r0, r1) of
  // chunk ch; first: the first pass (builds, computes the maxima and, with
  // sum, the row sums).  Pass p runs its blocks last to first when p is
  // odd: a kept kernel larger than the cache is then read from where the
  // previous pass ended, whose blocks are still in the cache (measured,
  // Intel Xeon, 2 slices of n = 50176, m = 750: see docs/set_attention.md).
  template <typename F>
  void blocks(int64_t ch, int64_t r0, int64_t r1, bool first, T *sum,
              int64_t pass, F &&fn) const {
    const int64_t count = (r1 - r0 + rows - 1) / rows;
    for (int64_t k = 0; k < count; ++k) {
      const int64_t i0 = r0 + rows * (pass % 2 ? count - 1 - k : k);
      const int64_t nb = std::min(rows, r1 - i0);
      T *Kb = K ? K + i0 * m : buf + ch * rows * m;
      if (first || !K)
        kernel_block(qf + i0 * dp, rf, m, dp, nb, Kb, mx + i0, first,
                     sum ? sum + i0 : nullptr);
      fn(i0, nb, static_cast<const T *>(Kb));
    }
  }
};

// A workspace carved into consecutive buffers.
template <typename T>
struct Carve {
  T *p;
  T *take(int64_t len) {
    T *out = p;
    p += len;
    return out;
  }
};

inline int64_t pad8(int64_t x) { return (x + 7) / 8 * 8; }

// BLAS runs thin products far faster with widths that are multiples of 8
// (measured: 29 columns at ~12 GMAC/s, 32 at ~16-19 on one core), so the
// [values | 1] matrices of the aggregations are zero-padded to c = pad8(d+1)
// columns, and the factors of dL/dK to r = 2c + pad8(1 + 2T).
template <typename T>
struct Dims {
  int64_t n, m, dp, d, iters;
  T eps, delta;  // of the query features (query_features)
  bool stream;  // rebuild the kernel's blocks in every pass (KernelRows)
  int64_t share_bytes;  // see slices_share_pool
  // bytes of the n x m kernel a slice keeps while it runs
  int64_t kept_bytes() const {
    return stream ? 0 : n * m * static_cast<int64_t>(sizeof(T));
  }
  int64_t c() const { return pad8(d + 1); }
  int64_t rank() const { return 2 * c() + pad8(1 + 2 * iters); }
  int64_t rows() const { return build_rows<T>(m); }
  // the kernel's buffers: kept n x m, or a block per chunk; + the maxima
  int64_t kernel_ws(int64_t chunks) const {
    return (stream ? chunks * rows() * m : n * m) + n;
  }
  KernelRows<T> kernel(const T *qf, const T *rf, Carve<T> &ws,
                       int64_t chunks) const {
    T *K = stream ? nullptr : ws.take(n * m);
    T *mx = ws.take(n);
    T *buf = stream ? ws.take(chunks * rows() * m) : nullptr;
    return {qf, rf, m, dp, rows(), K, mx, buf};
  }
};

// The slice's query features (n x dp, the first buffer of its workspace),
// built over the chunks of rows.
template <typename T>
T *slice_features(const Dims<T> &D, const Rows &R, RowsOf<T> q, const T *tok,
                  Carve<T> &W) {
  T *qf = W.take(D.n * D.dp);
  R.run([&](int64_t, int64_t r0, int64_t r1) {
    query_features(q, tok, D.d, D.dp - D.d, D.eps, D.delta, r0, r1, qf);
  });
  return qf;
}

// x *= a
template <typename T>
void scale(T a, T *x, int64_t len) {
  for (int64_t j = 0; j < len; ++j) x[j] *= a;
}

// Rows [i0, i1) of X4 = [a^ v | a^ | 0...] (c columns), a^ = a / top, into
// X4b (a block: row i at X4b + (i - i0) c).
template <typename T>
void rows_x4(const T *a, RowsOf<T> v, T top, int64_t d, int64_t c,
             int64_t i0, int64_t i1, T *X4b) {
  for (int64_t i = i0; i < i1; ++i) {
    const T ah = a[i] / top;
    T *x = X4b + (i - i0) * c;
    for (int64_t k = 0; k < d; ++k) x[k] = ah * v[i][k];
    x[d] = ah;
    std::fill(x + d + 1, x + c, T(0));
  }
}

// Per-slice vectors of the forward, kept for the backward: a_t, u_t for
// t = 0..T, b_t for t = 0..T (b_0 = 1), s_t for t < T, and the outputs'
// normalisers.
template <typename T>
struct Saved {
  T *a, *u, *b, *s, *z, *s4, *w, *tops;
};

// Workspace of one slice; `chunks` row chunks need chunks - 1 partials of
// the column sums (m x c for z; m x max(dp, c) in the backward).
template <typename T>
int64_t forward_ws(const Dims<T> &D, int64_t chunks) {
  const int64_t c = D.c();
  return D.n * D.dp + D.kernel_ws(chunks) + chunks * D.rows() * c +
         2 * D.m * c + (chunks - 1) * D.m * c;
}

// One slice: T + 2 passes over the kernel's rows.  Pass t <= T: u_t = K b_t
// (the row sums in the first pass, b_0 = 1), a_t = 1 / (n u_t) and, for
// t < T, that block's share of s_t = K^T a_t while its rows are hot; in
// the last of them (t = T) the block's share of [Z~ | s4] = K^T [a^ v | a^]
// instead.  Then [Y~ | w] = K [b^ z | b^].
template <typename T>
void forward_slice(const Dims<T> &D, RowsOf<T> q, const T *tok, const T *rf,
                   RowsOf<T> v, RowsOf<T, T> y, const Saved<T> &S,
                   T *ws) {
  const int64_t n = D.n, m = D.m, d = D.d, c = D.c(), iters = D.iters,
                rows = D.rows();
  const T inv_n = T(1) / n, inv_m = T(1) / m;
  const Rows R(n);
  Carve<T> W{ws};
  T *qf = slice_features(D, R, q, tok, W);
  const KernelRows<T> KR = D.kernel(qf, rf, W, R.chunks);
  T *Xb = W.take(R.chunks * rows * c), *Z4 = W.take(m * c),
    *X5 = W.take(m * c), *part = W.take((R.chunks - 1) * m * c);
  std::fill(S.b, S.b + m, T(1));
  // a^ = a_T / max(a_T): the max runs over all rows, so a chunk keeps its
  // z sums relative to its running max and rescales them when the max
  // grows (as online softmax does); chunks are merged at the common max.
  std::vector<T> tops(R.chunks);
  for (int64_t t = 0; t <= iters; ++t) {
    const bool last = t == iters;
    const T *b = S.b + t * m;
    T *u = S.u + t * n, *a = S.a + t * n, *s = last ? nullptr : S.s + t * m;
    R.run([&](int64_t ch, int64_t r0, int64_t r1) {
      T *sc = s ? R.partial(s, part, ch, m) : nullptr;
      T *Zc = ch == 0 ? Z4 : part + (ch - 1) * m * c;
      T *X4b = Xb + ch * rows * c;
      T top = std::numeric_limits<T>::min();
      if (sc) std::fill(sc, sc + m, T(0));
      if (last) std::fill(Zc, Zc + m * c, T(0));
      KR.blocks(ch, r0, r1, t == 0, u, t,
                [&](int64_t i0, int64_t nb, const T *Kb) {
        T blk = top;
        for (int64_t i = i0; i < i0 + nb; ++i) {
          const T *row = Kb + (i - i0) * m;
          prefetch_row(row + kPrefetchRows * m, m);
          if (t > 0) u[i] = dot(row, b, m);
          a[i] = safe_div(inv_n, u[i]);
          if (sc) axpy(a[i], row, sc, m);
          blk = std::max(blk, a[i]);
        }
        if (!last) return;
        if (blk > top) scale(top / blk, Zc, m * c);
        top = blk;
        rows_x4(a, v, top, d, c, i0, i0 + nb, X4b);
        mm<T>(true, false, m, c, nb, T(1), Kb, m, X4b, c, T(1), Zc, c);
      });
      if (last) tops[ch] = top;
    });
    if (last) break;
    R.reduce(s, part, m);
    T *b_next = S.b + (t + 1) * m;
    for (int64_t j = 0; j < m; ++j) b_next[j] = safe_div(inv_m, s[j]);
  }
  const T *b = S.b + iters * m;
  T b_top = std::numeric_limits<T>::min();
  for (int64_t j = 0; j < m; ++j) b_top = std::max(b_top, b[j]);
  const T a_top = *std::max_element(tops.begin(), tops.end());
  scale(tops[0] / a_top, Z4, m * c);
  for (int64_t ch = 1; ch < R.chunks; ++ch)
    axpy(tops[ch] / a_top, part + (ch - 1) * m * c, Z4, m * c);
  S.tops[0] = a_top;
  S.tops[1] = b_top;
  std::fill(X5, X5 + m * c, T(0));
  for (int64_t j = 0; j < m; ++j) {
    const T s4 = Z4[j * c + d], bh = b[j] / b_top;
    S.s4[j] = s4;  // >= exp(-floor) * max(a^) = exp(-floor)
    for (int64_t k = 0; k < d; ++k) {
      const T zk = Z4[j * c + k] / s4;
      S.z[j * d + k] = zk;
      X5[j * c + k] = bh * zk;
    }
    X5[j * c + d] = bh;
  }
  // y_i = sum_j P_ij z_j / sum_j P_ij: [Y~ | w] = K [b^ z | b^], by blocks
  // of rows over the chunks (BLAS splits one tall-skinny product over the
  // pool poorly)
  R.run([&](int64_t ch, int64_t r0, int64_t r1) {
    T *Y5 = Xb + ch * rows * c;
    KR.blocks(ch, r0, r1, false, nullptr, iters + 1,
              [&](int64_t i0, int64_t nb, const T *Kb) {
      mm<T>(false, false, nb, c, m, T(1), Kb, m, X5, c, T(0), Y5, c);
      for (int64_t i = i0; i < i0 + nb; ++i) {
        const T *y5 = Y5 + (i - i0) * c;
        S.w[i] = y5[d];
        T *yi = y[i];
        for (int64_t k = 0; k < d; ++k) yi[k] = y5[k] / y5[d];
      }
    });
  });
}

template <typename T>
int64_t backward_ws(const Dims<T> &D, int64_t chunks) {
  const int64_t r = D.rank(), c = D.c();
  return D.n * D.dp + D.kernel_ws(chunks) + D.n * r + D.m * r +
         chunks * D.rows() * std::max(c, D.dp) + D.m * c +
         chunks * D.rows() * D.m + 3 * D.m +
         (chunks - 1) * D.m * std::max(D.dp, c);
}

// Gradients of one slice.  dL/dK is gathered as U V^T, one rank-(d+1) term
// per aggregation and one rank-1 term per Sinkhorn product; then
// dL/dlogK = dL/dK * K (0 where clamped) a block of rows at a time.  T + 3
// passes over the kernel's rows: K^T G5, then K G4 with K^T gu_T on the
// same rows, one per Sinkhorn step in reverse, and dL/dlogK.
template <typename T>
void backward_slice(const Dims<T> &D, RowsOf<T> q, const T *tok, const T *rf,
                    RowsOf<T> v, RowsOf<T> y, RowsOf<T> gy,
                    const Saved<T> &S,
                    T *gq, T *grf, T *gv, T *ws) {
  const int64_t n = D.n, m = D.m, dp = D.dp, d = D.d, c = D.c(),
                iters = D.iters, r = D.rank(), rows = D.rows();
  const Rows R(n);
  Carve<T> W{ws};
  T *qf = slice_features(D, R, q, tok, W);
  const KernelRows<T> KR = D.kernel(qf, rf, W, R.chunks);
  // Xb: a chunk's block of [values | 1] rows (c) or of dL/dqf rows (dp)
  const int64_t xw = std::max(c, dp);
  T *U = W.take(n * r), *Vf = W.take(m * r),
    *Xb = W.take(R.chunks * rows * xw), *gX5 = W.take(m * c),
    *G = W.take(R.chunks * rows * m), *gb = W.take(m),
    *gb_next = W.take(m), *gs = W.take(m),
    *part = W.take((R.chunks - 1) * m * std::max(dp, c));
  std::fill(U, U + n * r, T(0));
  std::fill(Vf, Vf + m * r, T(0));
  const T a_top = S.tops[0], b_top = S.tops[1];
  const T *a_T = S.a + iters * n, *u_T = S.u + iters * n,
          *b_T = S.b + iters * m;
  // y = Y~ / w with [Y~ | w] = K X5: factor G5 in U[:, 0:c], X5 in V
  for (int64_t i = 0; i < n; ++i) {
    T *g5 = U + i * r;
    const T *yi = y[i], *gyi = gy[i];
    T dyy = 0;
    for (int64_t k = 0; k < d; ++k) {
      g5[k] = gyi[k] / S.w[i];
      dyy += g5[k] * yi[k];
    }
    g5[d] = -dyy;
  }
  for (int64_t j = 0; j < m; ++j) {
    const T bh = b_T[j] / b_top;
    for (int64_t k = 0; k < d; ++k) Vf[j * r + k] = bh * S.z[j * d + k];
    Vf[j * r + d] = bh;
  }
  // gX5 = K^T G5 (per-chunk partials)
  R.run([&](int64_t ch, int64_t r0, int64_t r1) {
    T *gc = R.partial(gX5, part, ch, m * c);
    std::fill(gc, gc + m * c, T(0));
    KR.blocks(ch, r0, r1, true, nullptr, 0,
              [&](int64_t i0, int64_t nb, const T *Kb) {
      mm<T>(true, false, m, c, nb, T(1), Kb, m, U + i0 * r, r, T(1), gc, c);
    });
  });
  R.reduce(gX5, part, m * c);
  // z = Z~ / s4 with [Z~ | s4] = K^T X4: X4 in U[:, c:2c], G4 in V
  for (int64_t j = 0; j < m; ++j) {
    const T bh = b_T[j] / b_top;
    T *g4 = Vf + j * r + c;
    T gbh = gX5[j * c + d], dzz = 0;
    for (int64_t k = 0; k < d; ++k) {
      const T gxk = gX5[j * c + k];
      gbh += S.z[j * d + k] * gxk;
      g4[k] = bh * gxk / S.s4[j];
      dzz += g4[k] * S.z[j * d + k];
    }
    g4[d] = -dzz;
    gb[j] = gbh / b_top;
  }
  const int64_t cT = 2 * c;  // the last row scaling's column
  for (int64_t j = 0; j < m; ++j) Vf[j * r + cT] = b_T[j];
  // gX4 = K G4 by blocks; on the same rows, a_T = 1 / (n u_T) with
  // u_T = K b_T: gu_T, and gb += K^T gu_T (gb holds the aggregation's
  // part: chunk 0 adds to it)
  R.run([&](int64_t ch, int64_t r0, int64_t r1) {
    T *gc = R.partial(gb, part, ch, m), *gX4 = Xb + ch * rows * xw;
    if (ch > 0) std::fill(gc, gc + m, T(0));
    KR.blocks(ch, r0, r1, false, nullptr, 1,
              [&](int64_t i0, int64_t nb, const T *Kb) {
      mm<T>(false, false, nb, c, m, T(1), Kb, m, Vf + c, r, T(0), gX4, c);
      for (int64_t i = i0; i < i0 + nb; ++i) {
        const T ah = a_T[i] / a_top, *gx = gX4 + (i - i0) * c;
        T *x4 = U + i * r + c;
        T gah = gx[d];
        for (int64_t k = 0; k < d; ++k) {
          x4[k] = ah * v[i][k];
          gv[i * d + k] = ah * gx[k];
          gah += v[i][k] * gx[k];
        }
        x4[d] = ah;
        const T gu = safe_div_grad(gah / a_top, a_T[i], u_T[i]);
        U[i * r + cT] = gu;
        axpy(gu, Kb + (i - i0) * m, gc, m);
      }
    });
  });
  R.reduce(gb, part, m);
  // Sinkhorn in reverse; step t: b_{t+1} = 1 / (m s_t), s_t = K^T a_t,
  // a_t = 1 / (n u_t), u_t = K b_t.  One fused pass per step.
  for (int64_t t = iters - 1; t >= 0; --t) {
    const T *a_t = S.a + t * n, *u_t = S.u + t * n, *b_t = S.b + t * m,
            *s_t = S.s + t * m, *b_next = S.b + (t + 1) * m;
    const int64_t ca = cT + 1 + 2 * t, cu = ca + 1;
    for (int64_t j = 0; j < m; ++j) {
      gs[j] = safe_div_grad(gb[j], b_next[j], s_t[j]);
      Vf[j * r + ca] = gs[j];
      Vf[j * r + cu] = b_t[j];
    }
    R.run([&](int64_t ch, int64_t r0, int64_t r1) {
      T *gc = R.partial(gb_next, part, ch, m);
      if (t > 0) std::fill(gc, gc + m, T(0));
      // passes count on from the two above: step T - 1 is pass 2
      KR.blocks(ch, r0, r1, false, nullptr, iters + 1 - t,
                [&](int64_t i0, int64_t nb, const T *Kb) {
        for (int64_t i = i0; i < i0 + nb; ++i) {
          const T *row = Kb + (i - i0) * m;
          prefetch_row(row + kPrefetchRows * m, m);
          const T gu = safe_div_grad(dot(row, gs, m), a_t[i], u_t[i]);
          U[i * r + ca] = a_t[i];
          U[i * r + cu] = gu;
          if (t > 0) axpy(gu, row, gc, m);
        }
      });
    });
    if (t > 0) R.reduce(gb_next, part, m);
    std::swap(gb, gb_next);
  }
  // dL/dlogK, then through logK = qf rf^T
  const T floor_ = std::exp(static_cast<T>(-kLogFloor));
  R.run([&](int64_t ch, int64_t r0, int64_t r1) {
    T *Gc = G + ch * rows * m, *grc = R.partial(grf, part, ch, m * dp);
    if (grf) std::fill(grc, grc + m * dp, T(0));
    KR.blocks(ch, r0, r1, false, nullptr, iters + 2,
              [&](int64_t i0, int64_t nb, const T *Kb) {
      mm<T>(false, true, nb, m, r, T(1), U + i0 * r, r, Vf, r, T(0), Gc, m);
      for (int64_t e = 0; e < nb * m; ++e)
        Gc[e] = Kb[e] > floor_ ? Gc[e] * Kb[e] : T(0);
      if (gq) {  // dL/dqf, then through the query features to dL/dq
        T *gqf = Xb + ch * rows * xw;
        mm<T>(false, false, nb, dp, m, T(1), Gc, m, rf, dp, T(0), gqf, dp);
        query_grads(q, gqf, dp, d, D.eps, D.delta, i0, i0 + nb, gq);
      }
      if (grf)
        mm<T>(true, false, m, dp, nb, T(1), Gc, m, qf + i0 * dp, dp, T(1),
              grc, dp);
    });
  });
  if (grf) R.reduce(grf, part, m * dp);
}

void check(const torch::Tensor &t, const char *name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims");
}

// Slices run in parallel, a contiguous range per thread, each thread in its
// own workspace; or one after the other, each over the whole pool (see
// Rows): with fewer slices than threads, and where the kernels kept by one
// slice per thread would add up to more than D.share_bytes.  One slice at
// a time keeps less in memory at once, so more of a kernel that outgrows
// the caches is still in the last-level cache when the next pass starts on
// it (measured, Intel Xeon, 2 threads, m = 750, T = 3, per 3136 tokens of
// 2 slices: n = 25088, 2 x 75 MB, 6.63 ms against 7.09; n = 50176,
// 2 x 150 MB, 7.31 against 8.49, forward + backward 23.5 against 24.9;
// n = 12544, 2 x 38 MB, 19.9 against 19.4 forward + backward on that VM,
// but 0.80x the forward's time and 0.91x forward + backward's on a later
// one: fused_cpu.SHARE_BYTES has the figures behind its default).
// ws_elems(chunks) is a slice's workspace; slices_ws the whole call's.
template <typename T>
bool slices_share_pool(int64_t S, const Dims<T> &D) {
  if (at::in_parallel_region()) return false;
  const int64_t threads = at::get_num_threads();
  return S < threads || (threads > 1 && std::min(S, threads) *
                                              D.kept_bytes() > D.share_bytes);
}

template <typename T, typename W>
int64_t slices_ws(int64_t S, const Dims<T> &D, W &&ws_elems) {
  const int64_t threads = at::get_num_threads();
  if (slices_share_pool(S, D)) return ws_elems(threads);
  return std::max<int64_t>(1, std::min<int64_t>(S, threads)) * ws_elems(1);
}

// The call's workspace: `given` where it is large enough (a buffer the
// caller reuses across calls: a fresh one of n x m per slice costs as much
// in page faults, on first touch, as the passes over it), else a new one.
inline torch::Tensor workspace(const c10::optional<torch::Tensor> &given,
                               int64_t elems, const torch::Tensor &like) {
  if (given && given->defined()) {
    TORCH_CHECK(given->is_contiguous() && given->device().is_cpu() &&
                    given->scalar_type() == like.scalar_type(),
                "workspace must be a contiguous CPU tensor of the inputs' "
                "dtype");
    if (given->numel() >= elems) return *given;
  }
  return torch::empty({elems}, like.options());
}

template <typename T, typename W, typename F>
void for_slices(int64_t S, const Dims<T> &D, W &&ws_elems,
                const torch::Tensor &ws, F &&fn) {
  T *base = ws.data_ptr<T>();
  if (slices_share_pool(S, D)) {
    for (int64_t s = 0; s < S; ++s) fn(s, base);
    return;
  }
  const int64_t workers = std::max<int64_t>(
                    1, std::min<int64_t>(S, at::get_num_threads())),
                per_ws = ws_elems(1);
  const int64_t per = (S + workers - 1) / workers;
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w)
      for (int64_t s = w * per; s < std::min(S, (w + 1) * per); ++s)
        fn(s, base + w * per_ws);
  });
}

template <typename T>
Saved<T> saved_of(int64_t s, int64_t n, int64_t m, int64_t d, int64_t iters,
                  const std::vector<torch::Tensor> &t) {
  const int64_t k = iters + 1, ks = std::max<int64_t>(iters, 1);
  return {t[0].data_ptr<T>() + s * k * n, t[1].data_ptr<T>() + s * k * n,
          t[2].data_ptr<T>() + s * k * m, t[3].data_ptr<T>() + s * ks * m,
          t[4].data_ptr<T>() + s * m * d, t[5].data_ptr<T>() + s * m,
          t[6].data_ptr<T>() + s * n,     t[7].data_ptr<T>() + s * 2};
}

// Slices whose n x m kernel is larger than stream_bytes stream it (see
// KernelRows); share_bytes: see slices_share_pool.
template <typename T>
Dims<T> dims(int64_t n, int64_t m, int64_t dp, int64_t d, int64_t iters,
             int64_t stream_bytes, int64_t share_bytes, double eps = 1,
             double delta = 0) {
  return {n,
          m,
          dp,
          d,
          iters,
          static_cast<T>(eps),
          static_cast<T>(delta),
          n * m * static_cast<int64_t>(sizeof(T)) > stream_bytes,
          share_bytes};
}

// q and v: (B, h, n, d), rows of unit stride; slice s = b h + head.
void check_rows(const torch::Tensor &t, const char *name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 4 && (t.stride(3) == 1 || t.size(3) <= 1), name,
              " must be (B, h, n, d) with rows of unit stride");
}

template <typename T, typename E = const T>
RowsOf<T, E> rows_of(const torch::Tensor &t, int64_t s) {
  const int64_t h = t.size(1);
  return {t.data_ptr<T>() + (s / h) * t.stride(0) + (s % h) * t.stride(1),
          t.stride(2)};
}

// Elements of a call's workspace for these shapes (S slices) and element
// size (4: float, 8: double), for the caller that hands one in (Python's
// kept scratch buffer); slice_ws(D, chunks) is forward_ws or backward_ws.
template <typename W>
int64_t call_ws(W &&slice_ws, int64_t S, int64_t n, int64_t m, int64_t dp,
                int64_t d, int64_t iters, int64_t stream_bytes,
                int64_t share_bytes, int64_t itemsize) {
  auto elems = [&](auto D) {
    return slices_ws(S, D, [&](int64_t ch) { return slice_ws(D, ch); });
  };
  return itemsize == 8 ? elems(dims<double>(n, m, dp, d, iters, stream_bytes,
                                            share_bytes))
                       : elems(dims<float>(n, m, dp, d, iters, stream_bytes,
                                           share_bytes));
}

int64_t forward_workspace(int64_t S, int64_t n, int64_t m, int64_t dp,
                          int64_t d, int64_t iters, int64_t stream_bytes,
                          int64_t share_bytes, int64_t itemsize) {
  return call_ws([](const auto &D, int64_t ch) { return forward_ws(D, ch); },
                 S, n, m, dp, d, iters, stream_bytes, share_bytes, itemsize);
}

std::vector<torch::Tensor> set_forward(torch::Tensor q, torch::Tensor tok,
                                       torch::Tensor rf, torch::Tensor v,
                                       double eps, double delta,
                                       int64_t iters, int64_t stream_bytes,
                                       int64_t share_bytes,
                                       c10::optional<torch::Tensor> ws_in) {
  check_rows(q, "q");
  check_rows(v, "v");
  check(tok, "tok", 2);
  check(rf, "rf", 3);
  const int64_t B = q.size(0), h = q.size(1), S = B * h, n = q.size(2),
                d = q.size(3), H = rf.size(0), m = rf.size(1),
                dp = rf.size(2);
  TORCH_CHECK(H == h && v.size(0) == B && v.size(1) == h &&
                  v.size(2) == n && v.size(3) == d && tok.size(0) == n &&
                  tok.size(1) == dp - d && iters >= 0 && eps > 0,
              "set_forward: inconsistent shapes");
  TORCH_CHECK(q.scalar_type() == rf.scalar_type() &&
                  q.scalar_type() == v.scalar_type() &&
                  q.scalar_type() == tok.scalar_type(),
              "set_forward: one dtype for all inputs");
  auto opt = q.options();
  // y (B, h, n, d) stored as (B, n, h, d), the heads' concatenation: the
  // layer's output projection then reads (and saves for its backward) the
  // tensor saved here, instead of a transposed copy of it
  auto y = torch::empty({q.size(0), n, h, d}, opt).permute({0, 2, 1, 3});
  auto A = torch::empty({S, iters + 1, n}, opt);
  auto Uv = torch::empty({S, iters + 1, n}, opt);
  auto Bv = torch::empty({S, iters + 1, m}, opt);
  auto Sv = torch::empty({S, std::max<int64_t>(iters, 1), m}, opt);
  auto z = torch::empty({S, m, d}, opt);
  auto s4 = torch::empty({S, m}, opt);
  auto w = torch::empty({S, n}, opt);
  auto tops = torch::empty({S, 2}, opt);
  const std::vector<torch::Tensor> saved{A, Uv, Bv, Sv, z, s4, w, tops};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "set_forward", [&] {
    using T = scalar_t;
    const Dims<T> D = dims<T>(n, m, dp, d, iters, stream_bytes, share_bytes,
                              eps, delta);
    const T *r = rf.data_ptr<T>(), *tk = tok.data_ptr<T>();
    auto ws_elems = [&](int64_t ch) { return forward_ws(D, ch); };
    const auto ws_t = workspace(ws_in, slices_ws(S, D, ws_elems), q);
    for_slices<T>(S, D, ws_elems, ws_t, [&](int64_t s, T *ws) {
      forward_slice(D, rows_of<T>(q, s), tk, r + (s % H) * m * dp,
                    rows_of<T>(v, s), rows_of<T, T>(y, s),
                    saved_of<T>(s, n, m, d, iters, saved), ws);
    });
  });
  return {y, A, Uv, Bv, Sv, z, s4, w, tops};
}

int64_t backward_workspace(int64_t S, int64_t n, int64_t m, int64_t dp,
                           int64_t d, int64_t iters, int64_t stream_bytes,
                           int64_t share_bytes, int64_t itemsize) {
  return call_ws([](const auto &D, int64_t ch) { return backward_ws(D, ch); },
                 S, n, m, dp, d, iters, stream_bytes, share_bytes, itemsize);
}

// Asks the kernel to back the 2 MiB-aligned interior of a buffer not yet
// touched with huge pages (Linux, transparent huge pages in "madvise"
// mode), for the buffer the Python side keeps between calls: passes over a
// kept kernel of hundreds of MiB miss the TLB less (a forward at n = 50176,
// m = 750: 153 -> 140 ms).  Returns whether the advice was taken.
bool advise_huge_pages(torch::Tensor buf) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto p = reinterpret_cast<uintptr_t>(buf.data_ptr());
  const uintptr_t lo = (p + kHuge - 1) / kHuge * kHuge,
                  hi = (p + buf.nbytes()) / kHuge * kHuge;
  return hi > lo &&
         madvise(reinterpret_cast<void *>(lo), hi - lo, MADV_HUGEPAGE) == 0;
#else
  (void)buf;
  return false;
#endif
}

// Returns gq (S, n, d) or empty, grf per slice (S, m, dp) or empty, gv.
std::vector<torch::Tensor> set_backward(
    torch::Tensor q, torch::Tensor tok, torch::Tensor rf, torch::Tensor v,
    torch::Tensor y, torch::Tensor gy, torch::Tensor A, torch::Tensor Uv,
    torch::Tensor Bv, torch::Tensor Sv, torch::Tensor z, torch::Tensor s4,
    torch::Tensor w, torch::Tensor tops, bool need_q, bool need_rf,
    double eps, double delta, int64_t stream_bytes, int64_t share_bytes,
    c10::optional<torch::Tensor> ws_in) {
  check_rows(q, "q");
  check_rows(v, "v");
  check(tok, "tok", 2);
  check(rf, "rf", 3);
  check_rows(y, "y");
  check_rows(gy, "gy");
  const int64_t h = q.size(1), S = q.size(0) * h, n = q.size(2),
                d = q.size(3), H = rf.size(0), m = rf.size(1),
                dp = rf.size(2), iters = A.size(1) - 1;
  TORCH_CHECK(v.sizes() == q.sizes() && y.sizes() == q.sizes() &&
                  gy.sizes() == q.sizes(),
              "set_backward: q, v, y and gy must have one shape");
  auto opt = q.options();
  auto gq = need_q ? torch::empty({S, n, d}, opt) : torch::Tensor();
  auto grf = need_rf ? torch::empty({S, m, dp}, opt) : torch::Tensor();
  auto gv = torch::empty({S, n, d}, opt);
  const std::vector<torch::Tensor> saved{A, Uv, Bv, Sv, z, s4, w, tops};
  for (const auto &t : saved)
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == q.scalar_type(),
                "set_backward: saved tensors must be contiguous, one dtype");
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "set_backward", [&] {
    using T = scalar_t;
    const Dims<T> D = dims<T>(n, m, dp, d, iters, stream_bytes, share_bytes,
                              eps, delta);
    const T *r = rf.data_ptr<T>(), *tk = tok.data_ptr<T>();
    T *gqp = need_q ? gq.data_ptr<T>() : nullptr,
      *gr = need_rf ? grf.data_ptr<T>() : nullptr, *gvp = gv.data_ptr<T>();
    auto ws_elems = [&](int64_t ch) { return backward_ws(D, ch); };
    const auto ws_t = workspace(ws_in, slices_ws(S, D, ws_elems), q);
    for_slices<T>(S, D, ws_elems, ws_t, [&](int64_t s, T *ws) {
      backward_slice(D, rows_of<T>(q, s), tk, r + (s % H) * m * dp,
                     rows_of<T>(v, s), rows_of<T>(y, s), rows_of<T>(gy, s),
                     saved_of<T>(s, n, m, d, iters, saved),
                     gqp ? gqp + s * n * d : nullptr,
                     gr ? gr + s * m * dp : nullptr, gvp + s * n * d, ws);
    });
  });
  return {gq, grf, gv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("forward", &set_forward,
          "SeT forward (fused, CPU) on queries q with the tokens' LPE "
          "features tok", py::arg("q"), py::arg("tok"), py::arg("rf"),
          py::arg("v"), py::arg("eps"), py::arg("delta"), py::arg("iters"),
          py::arg("stream_bytes"), py::arg("share_bytes"),
          py::arg("workspace") = py::none());
  mod.def("backward", &set_backward, "SeT backward (fused, CPU)",
          py::arg("q"), py::arg("tok"), py::arg("rf"), py::arg("v"),
          py::arg("y"), py::arg("gy"), py::arg("A"), py::arg("Uv"),
          py::arg("Bv"), py::arg("Sv"), py::arg("z"), py::arg("s4"),
          py::arg("w"), py::arg("tops"), py::arg("need_q"),
          py::arg("need_rf"), py::arg("eps"), py::arg("delta"),
          py::arg("stream_bytes"), py::arg("share_bytes"),
          py::arg("workspace") = py::none());
  mod.def("forward_workspace", &forward_workspace,
          "elements of the forward's workspace (S, n, m, dp, d, iters, "
          "stream_bytes, share_bytes, itemsize)");
  mod.def("backward_workspace", &backward_workspace,
          "elements of the backward's workspace (as forward_workspace)");
  mod.def("advise_huge_pages", &advise_huge_pages,
          "madvise(MADV_HUGEPAGE) on an untouched buffer; whether taken");
}
