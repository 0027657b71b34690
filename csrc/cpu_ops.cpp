// Native CPU ops for the packed encode path (inference only): RMSNorm (+ residual add), rotary embedding of q and
// k, SwiGLU's silu(gate) * up, and varlen attention with GQA (bidirectional or causal, with an optional sliding
// window and logit softcap). Registered as torch.ops.llm2vec_fast.*
// for CPU tensors; the host functions and PyTorch references live in llm2vec_fast/cpu_ops.py.
//
// Every op writes into outputs the caller allocates (so tests can hand in NaN-filled ones) and reproduces the
// rounding of the Hugging Face modules it replaces: fp32 math, results rounded to the storage dtype at the same
// points as the PyTorch expression (this file is compiled with -ffp-contract=off so that a*b + c*d stays two
// roundings, as in PyTorch). Work is split over rows (or over sequence x KV head x query block for attention), so
// every output element is computed by one thread in a fixed order: results do not depend on the thread count.

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#ifndef CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY_AVX512
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#ifndef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY_AVX2
#endif
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t VS = Vec::size();

// One vector of VS floats from VS elements of T, and back (rounding to nearest even for bf16); round_f rounds a
// float vector to T's precision and back (identity for float): the point where PyTorch materialises a T tensor
// between two ops. AVX-512 converts in registers; other targets go through at::vec's portable conversions.
inline Vec load_f(const float* p) { return Vec::loadu(p); }
inline void store_f(float* p, const Vec& v) { v.store(p); }
inline Vec round_f(const Vec& v, const float*) { return v; }
#if defined(CPU_CAPABILITY_AVX512)
inline Vec load_f(const BFloat16* p) {
  __m512 out;
  at::vec::cvtbf16_fp32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), out);
  return out;
}
inline void store_f(BFloat16* p, const Vec& v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(v));
}
inline Vec round_f(const Vec& v, const BFloat16*) {
  __m512 out;
  at::vec::cvtbf16_fp32(at::vec::cvtfp32_bf16(v), out);
  return out;
}
#else
inline Vec load_f(const BFloat16* p) {
  Vec out;
  at::vec::load_to_float<BFloat16>(p, out);
  return out;
}
inline void store_f(BFloat16* p, const Vec& v) { at::vec::convert_from_float<BFloat16>(v, v).store(p, VS); }
inline Vec round_f(const Vec& v, const BFloat16*) {
  BFloat16 tmp[VS];
  store_f(tmp, v);
  return load_f(tmp);
}
#endif
inline float round_s(float v, const float*) { return v; }
inline float round_s(float v, const BFloat16*) { return static_cast<float>(static_cast<BFloat16>(v)); }

void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), name, " must have dtype ", a.scalar_type(), ", got ",
              b.scalar_type());
}

// ------------------------------------------------------------------------------------------------- RMSNorm

// Llama:  out = w * T(x * rsqrt(mean(x^2) + eps))        (normalised value rounded to T before the weight)
// Gemma:  out = T(x * rsqrt(mean(x^2) + eps) * (1 + w))  (all in fp32, one rounding)
// With residual: x := T(x + residual) is written to sum_out first (the decoder layer's residual add).
// T is the residual stream's dtype (the residual's, or x's without one; the weight's too); X, x's dtype, and O,
// out's, may differ from it: the mixed-precision mode reads a bf16 projection output beside an fp32 stream and
// writes the bf16 input of the next bf16 GEMM, so that no separate conversion pass runs. With X = T = O every
// rounding is the one PyTorch makes.
template <typename X, typename T, typename O>
void rms_norm_kernel(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                     double eps, bool gemma, at::Tensor& out, const c10::optional<at::Tensor>& sum_out) {
  const int64_t rows = x.size(0), H = x.size(1);
  const X* px = x.data_ptr<X>();
  const T* pr = residual ? residual->data_ptr<T>() : nullptr;
  const T* pw = weight.data_ptr<T>();
  O* po = out.data_ptr<O>();
  T* ps = sum_out ? sum_out->data_ptr<T>() : nullptr;
  const T* tag = nullptr;  // selects T's rounding in round_f / round_s
  const int64_t sx = x.stride(0), sr = residual ? residual->stride(0) : 0, so = out.stride(0),
                ss = sum_out ? sum_out->stride(0) : 0;
  const int64_t Hv = H - H % VS;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(H);
    for (int64_t i = begin; i < end; ++i) {
      const X* xi = px + i * sx;
      Vec acc(0.f);
      float acc_s = 0.f;
      int64_t d = 0;
      for (; d < Hv; d += VS) {
        Vec v = load_f(xi + d);
        if (pr) {
          v = round_f(v + load_f(pr + i * sr + d), tag);
          store_f(ps + i * ss + d, v);
        }
        v.store(row.data() + d);
        acc = at::vec::fmadd(v, v, acc);
      }
      for (; d < H; ++d) {
        float v = static_cast<float>(xi[d]);
        if (pr) {
          v = round_s(v + static_cast<float>(pr[i * sr + d]), tag);
          ps[i * ss + d] = static_cast<T>(v);
        }
        row[d] = v;
        acc_s += v * v;
      }
      const float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc) + acc_s;
      const float r = 1.f / std::sqrt(sum / static_cast<float>(H) + static_cast<float>(eps));
      const Vec rv(r), one(1.f);
      O* oi = po + i * so;
      for (d = 0; d < Hv; d += VS) {
        Vec n = Vec::loadu(row.data() + d) * rv;
        Vec w = load_f(pw + d);
        store_f(oi + d, gemma ? n * (w + one) : w * round_f(n, tag));
      }
      for (; d < H; ++d) {
        float n = row[d] * r, w = static_cast<float>(pw[d]);
        oi[d] = static_cast<O>(gemma ? n * (w + 1.f) : w * round_s(n, tag));
      }
    }
  });
}

template <typename X, typename T>
void rms_norm_out(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                  double eps, bool gemma, at::Tensor& out, const c10::optional<at::Tensor>& sum_out) {
  if (out.scalar_type() == at::kFloat) {
    rms_norm_kernel<X, T, float>(x, residual, weight, eps, gemma, out, sum_out);
  } else {
    rms_norm_kernel<X, T, BFloat16>(x, residual, weight, eps, gemma, out, sum_out);
  }
}

template <typename X>
void rms_norm_stream(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                     double eps, bool gemma, at::Tensor& out, const c10::optional<at::Tensor>& sum_out) {
  if (weight.scalar_type() == at::kFloat) {
    rms_norm_out<X, float>(x, residual, weight, eps, gemma, out, sum_out);
  } else {
    rms_norm_out<X, BFloat16>(x, residual, weight, eps, gemma, out, sum_out);
  }
}

void rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight, double eps,
              bool gemma, at::Tensor out, c10::optional<at::Tensor> sum_out) {
  check_cpu_float(x, "x");
  check_cpu_float(out, "out");
  check_cpu_float(weight, "weight");
  // The stream's dtype: the residual's (x may then be the other float dtype), else x's.
  check_same(residual ? *residual : x, weight, "weight");
  TORCH_CHECK(x.dim() == 2 && out.sizes() == x.sizes(), "x and out must be [rows, hidden] of one shape");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(), "weight must be [hidden]");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, "x and out need a contiguous last dim");
  TORCH_CHECK(residual.has_value() == sum_out.has_value(), "residual and sum_out go together");
  if (residual) {
    check_cpu_float(*residual, "residual");
    check_same(*residual, *sum_out, "sum_out");
    TORCH_CHECK(residual->sizes() == x.sizes() && sum_out->sizes() == x.sizes(), "residual/sum_out shape mismatch");
    TORCH_CHECK(residual->stride(1) == 1 && sum_out->stride(1) == 1, "residual/sum_out need a contiguous last dim");
  }
  if (x.scalar_type() == at::kFloat) {
    rms_norm_stream<float>(x, residual, weight, eps, gemma, out, sum_out);
  } else {
    rms_norm_stream<BFloat16>(x, residual, weight, eps, gemma, out, sum_out);
  }
}

// -------------------------------------------------------------------------------------------------- rotary

// out = T(x * cos) + T(rotate_half(x) * sin), rounded again after the add, exactly as apply_rotary_pos_emb.
// x: [T, H, D] (any token / head strides, contiguous last dim), cos / sin: [T, D], out: [T, H, D].
// C is cos / sin's dtype and the precision of the intermediate products: C = T rounds as PyTorch does; fp32 tables
// with bf16 q / k (the mixed-precision mode) compute in fp32 and round once, to the bf16 output.
template <typename T, typename C>
void rotary_one(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  const int64_t Tn = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  const T* px = x.data_ptr<T>();
  const C* pc = cos.data_ptr<C>();
  const C* psn = sin.data_ptr<C>();
  const C* tag = nullptr;
  T* po = out.data_ptr<T>();
  const int64_t sxt = x.stride(0), sxh = x.stride(1), sot = out.stride(0), soh = out.stride(1),
                sct = cos.stride(0), sst = sin.stride(0);
  const int64_t hv = half - half % VS;
  at::parallel_for(0, Tn * H, 64, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t t = idx / H, h = idx % H;
      const T* xi = px + t * sxt + h * sxh;
      const C* c = pc + t * sct;
      const C* s = psn + t * sst;
      T* oi = po + t * sot + h * soh;
      int64_t d = 0;
      for (; d < hv; d += VS) {
        Vec x1 = load_f(xi + d), x2 = load_f(xi + half + d);
        Vec lo = round_f(x1 * load_f(c + d), tag) + round_f(x2.neg() * load_f(s + d), tag);
        Vec hi = round_f(x2 * load_f(c + half + d), tag) + round_f(x1 * load_f(s + half + d), tag);
        store_f(oi + d, lo);
        store_f(oi + half + d, hi);
      }
      for (; d < half; ++d) {
        float x1 = static_cast<float>(xi[d]), x2 = static_cast<float>(xi[half + d]);
        oi[d] = static_cast<T>(round_s(x1 * static_cast<float>(c[d]), tag) +
                               round_s(-x2 * static_cast<float>(s[d]), tag));
        oi[half + d] = static_cast<T>(round_s(x2 * static_cast<float>(c[half + d]), tag) +
                                      round_s(x1 * static_cast<float>(s[half + d]), tag));
      }
    }
  });
}

void rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin, at::Tensor q_out,
            at::Tensor k_out) {
  for (const at::Tensor* t : {&q, &k}) {
    check_cpu_float(*t, "q/k");
    check_same(q, *t, "k");
    TORCH_CHECK(t->dim() == 3 && t->stride(2) == 1 && t->size(2) % 2 == 0,
                "q and k must be [tokens, heads, even head_dim] with a contiguous last dim");
  }
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q_out, &k_out}) check_same(q, *t, "outputs");
  check_cpu_float(cos, "cos");
  check_same(cos, sin, "sin");
  TORCH_CHECK(cos.scalar_type() == q.scalar_type() || cos.scalar_type() == at::kFloat,
              "cos / sin must have q's dtype or float32, got ", cos.scalar_type());
  const int64_t Tn = q.size(0), D = q.size(2);
  TORCH_CHECK(k.size(0) == Tn && k.size(2) == D, "q and k disagree in tokens or head_dim");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == Tn && cos.size(1) == D && cos.stride(1) == 1 &&
                  sin.sizes() == cos.sizes() && sin.stride(1) == 1,
              "cos and sin must be [tokens, head_dim] with a contiguous last dim");
  TORCH_CHECK(q_out.sizes() == q.sizes() && k_out.sizes() == k.sizes() && q_out.stride(2) == 1 && k_out.stride(2) == 1,
              "outputs must match q and k");
  if (q.scalar_type() == at::kFloat) {
    rotary_one<float, float>(q, cos, sin, q_out);
    rotary_one<float, float>(k, cos, sin, k_out);
  } else if (cos.scalar_type() == at::kFloat) {
    rotary_one<BFloat16, float>(q, cos, sin, q_out);
    rotary_one<BFloat16, float>(k, cos, sin, k_out);
  } else {
    rotary_one<BFloat16, BFloat16>(q, cos, sin, q_out);
    rotary_one<BFloat16, BFloat16>(k, cos, sin, k_out);
  }
}

// ------------------------------------------------------------------------------------------------ SwiGLU

// out = T(T(silu(gate)) * up), as act_fn(gate_proj(x)) * up_proj(x). gate / up / out: [rows, I], any row stride
// (gate and up may be the two halves of one fused projection). round_act=false keeps silu(gate) in fp32 (one
// rounding, of the product: the mixed-precision mode, where the bf16 rounding of the activation measured as the
// largest single source of error).
template <typename T>
void silu_mul_kernel(const at::Tensor& gate, const at::Tensor& up, bool round_act, at::Tensor& out) {
  const int64_t rows = gate.size(0), I = gate.size(1);
  const T* pg = gate.data_ptr<T>();
  const T* pu = up.data_ptr<T>();
  T* po = out.data_ptr<T>();
  const int64_t sg = gate.stride(0), su = up.stride(0), so = out.stride(0);
  const int64_t Iv = I - I % VS;
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    const Vec one(1.f);
    for (int64_t i = begin; i < end; ++i) {
      const T* g = pg + i * sg;
      const T* u = pu + i * su;
      T* o = po + i * so;
      int64_t d = 0;
      for (; d < Iv; d += VS) {
        Vec gv = load_f(g + d);
        Vec act = gv / (one + gv.neg().exp_u20());
        if (round_act) act = round_f(act, g);
        store_f(o + d, act * load_f(u + d));
      }
      for (; d < I; ++d) {
        float gv = static_cast<float>(g[d]);
        float act = gv / (1.f + std::exp(-gv));
        if (round_act) act = round_s(act, g);
        o[d] = static_cast<T>(act * static_cast<float>(u[d]));
      }
    }
  });
}

void silu_mul(const at::Tensor& gate, const at::Tensor& up, at::Tensor out, bool round_act) {
  check_cpu_float(gate, "gate");
  check_same(gate, up, "up");
  check_same(gate, out, "out");
  TORCH_CHECK(gate.dim() == 2 && up.sizes() == gate.sizes() && out.sizes() == gate.sizes(),
              "gate, up and out must be [rows, intermediate] of one shape");
  TORCH_CHECK(gate.stride(1) == 1 && up.stride(1) == 1 && out.stride(1) == 1, "need a contiguous last dim");
  if (gate.scalar_type() == at::kFloat) {
    silu_mul_kernel<float>(gate, up, round_act, out);
  } else {
    silu_mul_kernel<BFloat16>(gate, up, round_act, out);
  }
}

// --------------------------------------------------------------------------------------- varlen attention

// Who sees whom inside one sequence, as Hugging Face's eager attention masks it: query i sees key j iff j <= i
// (causal) and |i - j| < window (window > 0; 0 = no window). Every query sees at least itself, so each row has keys.
// Both kernels compute scores only for the keys a query block can see (the union of its rows' [lo, hi)): a window
// or causality removes the work outside the band rather than masking it after the fact.
struct Band {
  bool causal;
  int64_t window;
  int64_t lo(int64_t i) const { return window > 0 ? std::max<int64_t>(0, i - window + 1) : 0; }
  int64_t hi(int64_t i, int64_t L) const { return causal ? i + 1 : window > 0 ? std::min(L, i + window) : L; }
  // Query rows per work item: with a window, about one window's worth (multiples of 16, at most `rows`), so that
  // a block's key span (its rows plus a window either side) stays near the keys its rows actually see.
  int64_t block_rows(int64_t rows) const {
    return window > 0 ? std::min(rows, std::max<int64_t>(16, (window + 15) / 16 * 16)) : rows;
  }
};

// Gemma 2's logit softcap, s -> c * tanh(s / c) on the scaled score, before masking and softmax, in fp32 (the
// scores are never rounded to bf16). The argument is s * (scale / c), one rounding where PyTorch's (s * scale) / c
// makes two: as accurate, without a vector division per score.
inline Vec soft_cap(const Vec& s, const Vec& scale_over_c, const Vec& c) { return (s * scale_over_c).tanh() * c; }
inline float soft_cap(float s, float scale_over_c, float c) { return std::tanh(s * scale_over_c) * c; }

// All-ones lanes for keys j0 + l inside [lo, hi), zero lanes elsewhere (a blendv mask).
inline Vec lanes_in(int64_t j0, int64_t lo, int64_t hi) {
  const Vec index = Vec::arange(static_cast<float>(j0), 1.f);
  return (index >= Vec(static_cast<float>(lo))) & (index < Vec(static_cast<float>(hi)));
}

// The portable kernel, plain at::vec FMA code: what runs where oneDNN has no brgemm micro-kernels for this CPU or
// dtype (varlen_attention_brgemm below is the fast path).
// Attention inside each packed sequence, no padding: q [T, HQ, D], k / v [T, HKV, D], out [T, HQ, D]. One work
// item = (sequence, KV head, block of QB query rows); it converts the keys its rows can see (the whole sequence
// without a mask; the band of Band::lo / hi with one) of K (transposed, [D, np]) and V ([n, Dp]) to fp32 once and
// runs every query head of the GQA group against them. Scores of a query block are held whole ([QB, np] floats),
// so the softmax is exact, not online; a key outside a row's own range gets probability 0 exactly. The fp32
// buffers grow with the key span (L <= a few thousand tokens is the encode regime).
constexpr int64_t QB = 32;  // query rows per work item
constexpr int64_t RB = 4;   // query rows per micro-kernel call
constexpr int64_t KB = 2 * VS;  // keys per score micro-kernel call

// s[r, j0 : j0 + KB] = q[r, :] . KT[:, j0 : j0 + KB] for RB rows (rows past `nr` repeat the last valid one).
inline void score_block(const float* q, int64_t ldq, int64_t nr, const float* kt, int64_t Lp, int64_t D, int64_t j0,
                        float* s, int64_t lds) {
  Vec acc[RB][2];
  for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = Vec(0.f);
  const float* qr[RB];
  for (int r = 0; r < RB; ++r) qr[r] = q + std::min<int64_t>(r, nr - 1) * ldq;
  for (int64_t d = 0; d < D; ++d) {
    Vec k0 = Vec::loadu(kt + d * Lp + j0), k1 = Vec::loadu(kt + d * Lp + j0 + VS);
    for (int r = 0; r < RB; ++r) {
      Vec qv(qr[r][d]);
      acc[r][0] = at::vec::fmadd(qv, k0, acc[r][0]);
      acc[r][1] = at::vec::fmadd(qv, k1, acc[r][1]);
    }
  }
  for (int r = 0; r < nr; ++r) {
    acc[r][0].store(s + r * lds + j0);
    acc[r][1].store(s + r * lds + j0 + VS);
  }
}

// o[r, c0 : c0 + NV*VS] = sum_j p[r, j] * v[j, c0 : ...] for RB rows.
template <int NV>
inline void pv_block(const float* p, int64_t ldp, int64_t nr, const float* v, int64_t Dp, int64_t L, int64_t c0,
                     float* o, int64_t ldo) {
  Vec acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = Vec(0.f);
  const float* pr[RB];
  for (int r = 0; r < RB; ++r) pr[r] = p + std::min<int64_t>(r, nr - 1) * ldp;
  for (int64_t j = 0; j < L; ++j) {
    Vec vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = Vec::loadu(v + j * Dp + c0 + c * VS);
    for (int r = 0; r < RB; ++r) {
      Vec pb(pr[r][j]);
      for (int c = 0; c < NV; ++c) acc[r][c] = at::vec::fmadd(pb, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < nr; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c].store(o + r * ldo + c0 + c * VS);
}

template <typename T>
void varlen_attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::vector<int64_t>& cu, double scale, const Band& band, double softcap,
                             at::Tensor& out) {
  const int64_t HQ = q.size(1), HKV = k.size(1), D = q.size(2), G = HQ / HKV;
  const int64_t Dp = (D + VS - 1) / VS * VS;
  const T* pq = q.data_ptr<T>();
  const T* pk = k.data_ptr<T>();
  const T* pv = v.data_ptr<T>();
  T* po = out.data_ptr<T>();
  const int64_t sqt = q.stride(0), sqh = q.stride(1), skt = k.stride(0), skh = k.stride(1), svt = v.stride(0),
                svh = v.stride(1), sot = out.stride(0), soh = out.stride(1);
  const int64_t rows = band.block_rows(QB);
  // Work items, longest sequences first so that the big ones do not end the parallel region alone.
  struct Item { int64_t b, h, m0; };
  std::vector<int64_t> order(cu.size() - 1);
  for (size_t b = 0; b < order.size(); ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cu[a + 1] - cu[a] > cu[b + 1] - cu[b]; });
  std::vector<Item> items;
  for (int64_t b : order)
    for (int64_t m0 = 0; m0 < cu[b + 1] - cu[b]; m0 += rows)
      for (int64_t h = 0; h < HKV; ++h) items.push_back({b, h, m0});
  const float fscale = static_cast<float>(scale), fcap = static_cast<float>(softcap);
  const float fscale_cap = softcap > 0 ? static_cast<float>(scale / softcap) : 0.f;
  // With a softcap the scores are capped in place (scale included), so the exponent takes them unscaled.
  const float escale = softcap > 0 ? 1.f : fscale;
  const int64_t n_items = static_cast<int64_t>(items.size());
  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt, vb, qb, sb, ob;
    for (int64_t it = begin; it < end; ++it) {
      const Item item = items[it];
      const int64_t start = cu[item.b], L = cu[item.b + 1] - start;
      const int64_t M = std::min(rows, L - item.m0);
      // Keys [k0, k1) are the union of the block's rows' ranges (each row's range is an interval, and both ends
      // grow with the row).
      const int64_t k0 = band.lo(item.m0), k1 = band.hi(item.m0 + M - 1, L), n = k1 - k0;
      const int64_t np = (n + KB - 1) / KB * KB;
      kt.assign(D * np, 0.f);
      vb.assign(n * Dp, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const T* kj = pk + (start + k0 + j) * skt + item.h * skh;
        const T* vj = pv + (start + k0 + j) * svt + item.h * svh;
        for (int64_t d = 0; d < D; ++d) {
          kt[d * np + j] = static_cast<float>(kj[d]);
          vb[j * Dp + d] = static_cast<float>(vj[d]);
        }
      }
      qb.resize(M * D);
      sb.resize(M * np);
      ob.resize(M * Dp);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t hq = item.h * G + g;
        for (int64_t r = 0; r < M; ++r) {
          const T* qr = pq + (start + item.m0 + r) * sqt + hq * sqh;
          for (int64_t d = 0; d < D; ++d) qb[r * D + d] = static_cast<float>(qr[d]);
        }
        for (int64_t r0 = 0; r0 < M; r0 += RB) {
          const int64_t nr = std::min(RB, M - r0);
          for (int64_t j0 = 0; j0 < np; j0 += KB)
            score_block(qb.data() + r0 * D, D, nr, kt.data(), np, D, j0, sb.data() + r0 * np, np);
        }
        for (int64_t r = 0; r < M; ++r) {
          float* s = sb.data() + r * np;
          // This row's keys [lo, hi) within the span; the others get probability 0 (P @ V reads all n).
          const int64_t i = item.m0 + r, lo = band.lo(i) - k0, hi = band.hi(i, L) - k0;
          int64_t j = lo;
          if (softcap > 0) {
            const Vec vsc(fscale_cap), vc(fcap);
            for (; j + VS <= hi; j += VS) soft_cap(Vec::loadu(s + j), vsc, vc).store(s + j);
            for (; j < hi; ++j) s[j] = soft_cap(s[j], fscale_cap, fcap);
          }
          float mx = -std::numeric_limits<float>::infinity();
          for (j = lo; j < hi; ++j) mx = std::max(mx, s[j]);
          // exp(scale * (s - max)), vectorised over keys.
          const Vec vs(escale), vm(mx);
          Vec vsum(0.f);
          for (j = lo; j + VS <= hi; j += VS) {
            Vec e = ((Vec::loadu(s + j) - vm) * vs).exp_u20();
            e.store(s + j);
            vsum = vsum + e;
          }
          float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
          for (; j < hi; ++j) {
            s[j] = std::exp((s[j] - mx) * escale);
            sum += s[j];
          }
          const float inv = 1.f / sum;
          for (j = lo; j < hi; ++j) s[j] *= inv;
          std::fill(s, s + lo, 0.f);
          std::fill(s + hi, s + n, 0.f);
        }
        for (int64_t r0 = 0; r0 < M; r0 += RB) {
          const int64_t nr = std::min(RB, M - r0);
          int64_t c0 = 0;
          for (; c0 + 4 * VS <= Dp; c0 += 4 * VS)
            pv_block<4>(sb.data() + r0 * np, np, nr, vb.data(), Dp, n, c0, ob.data() + r0 * Dp, Dp);
          for (; c0 < Dp; c0 += VS)
            pv_block<1>(sb.data() + r0 * np, np, nr, vb.data(), Dp, n, c0, ob.data() + r0 * Dp, Dp);
        }
        for (int64_t r = 0; r < M; ++r) {
          T* orow = po + (start + item.m0 + r) * sot + hq * soh;
          for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(ob[r * Dp + d]);
        }
      }
    }
  });
}

// ------------------------------------------------------------------- varlen attention on oneDNN's brgemm

// The same attention on the micro-GEMMs torch's own CPU flash attention uses (at::native::cpublas::brgemm: oneDNN
// ukernels: AMX / AVX-512 BF16 tiles for bf16, FMA for fp32; whether they exist is probed at first use). On one
// layer's attention over every batch of the benchmark encode (SmolLM2-135M shapes) it measured 3.3x the kernel above
// in bf16 and 2.2x in fp32, and 2.7x / 2.6x torch's grouped SDPA (benchmarks/bench_native.py): a short sequence
// costs two micro-GEMM calls, not an operator dispatch.
//
// One work item = (sequence, KV head, block of up to QB2 query rows). Its A matrix stacks the GQA group's query
// heads ([R * G, D], row r * G + g = query row r of head g), so that K and V are packed once for G heads:
//   S = A @ K^T[:, k0:k1]        [R*G, N]   fp32 accumulation (softcapped in place: c * tanh(scale * S / c))
//   P = exp(scale * (S - max))   unnormalised (scale 1 once capped), in T (bf16 P, as torch's flash attention
//                                rounds it; with fp32_probs P = hi + lo, two bf16 halves, for ~16 bits); fp32 stays
//                                fp32
//   O = (P @ V[k0:k1]) / rowsum(P)   [R*G, D]   fp32 accumulation and sum, rounded to T once.
// [k0, k1) is the block's key span: every key without a mask; with causality or a window, the union of its rows'
// ranges (Band), widened to multiples of 16, so the GEMMs skip the keys no row of the block sees. Keys of the span
// outside a row's own range get P = 0 exactly. bf16 B operands are packed into VNNI pairs ([K/2, N, 2]); fp32 ones
// are plain row-major. Keys are padded to Lp (a multiple of 16: bounds the number of distinct micro-kernel shapes,
// each JIT-compiled once per process) with zero K columns, zero V rows and zero P, so padding never reaches the
// output. Items are assigned to threads longest-first to the least-loaded thread (static partitioning would give one
// thread every long sequence), and each output element is computed by one item in a fixed order: results do not
// depend on the thread count.
constexpr int64_t QB2 = 64;  // query rows per work item
constexpr int64_t KPAD = 16;
static_assert(KPAD % VS == 0, "padded key rows must hold whole vectors");

// Whether oneDNN's brgemm ukernels exist for this CPU and dtype: probed once with a tiny call.
template <typename T>
bool brgemm_available() {
  static const bool ok = [] {
    try {
      T a[4] = {T(1.f), T(1.f), T(1.f), T(1.f)}, b[4] = {T(1.f), T(1.f), T(1.f), T(1.f)};
      float c[4] = {0.f, 0.f, 0.f, 0.f};
      const bool vnni = std::is_same<T, BFloat16>::value;
      at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b, c, vnni);
      at::native::cpublas::brgemm_release(vnni);
      return c[0] == 2.f && c[3] == 2.f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

template <typename T>
void varlen_attention_brgemm(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::vector<int64_t>& cu, double scale, bool fp32_probs, const Band& band,
                             double softcap, at::Tensor& out) {
  constexpr bool vnni = std::is_same<T, BFloat16>::value;
  const int64_t HQ = q.size(1), HKV = k.size(1), D = q.size(2), G = HQ / HKV;
  const int64_t De = vnni ? (D + 1) / 2 * 2 : D;  // the QK^T reduction dim, even for VNNI pairs
  const T* pq = q.data_ptr<T>();
  const T* pk = k.data_ptr<T>();
  const T* pv = v.data_ptr<T>();
  T* po = out.data_ptr<T>();
  const int64_t sqt = q.stride(0), sqh = q.stride(1), skt = k.stride(0), skh = k.stride(1), svt = v.stride(0),
                svh = v.stride(1), sot = out.stride(0), soh = out.stride(1);
  const int64_t B = static_cast<int64_t>(cu.size()) - 1;
  // Phase 1: K^T ([De, Lp]) and V ([Lp, D]) of every (sequence, KV head), packed once for all its query blocks.
  // base[b]: where sequence b's padded keys start in the packed buffers (in keys; times HKV heads).
  std::vector<int64_t> base(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) base[b + 1] = base[b] + (cu[b + 1] - cu[b] + KPAD - 1) / KPAD * KPAD;
  // Uninitialised (a std::vector would zero every element one by one: it measured 20% of a short-sequence call);
  // only the padding is zeroed below, with memset (0 bits are 0 in fp32 and bf16).
  const at::Tensor kpack_t = at::empty({base[B] * HKV * De}, q.options());
  const at::Tensor vpack_t = at::empty({vnni ? base[B] * HKV * D : 0}, q.options());
  T* kpack = kpack_t.data_ptr<T>();
  T* vpack = vpack_t.data_ptr<T>();
  at::parallel_for(0, B * HKV, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / HKV, h = pair % HKV, start = cu[b], L = cu[b + 1] - start,
                    Lp = base[b + 1] - base[b];
      T* kt = kpack + (base[b] * HKV + h * Lp) * De;
      if (vnni) {  // pad keys [L, Lp) of every VNNI row pair, and the pad dim D when D is odd
        for (int64_t dp = 0; dp < De / 2; ++dp) std::memset(kt + (dp * Lp + L) * 2, 0, (Lp - L) * 2 * sizeof(T));
        if (De > D)
          for (int64_t j = 0; j < L; ++j) kt[((D >> 1) * Lp + j) * 2 + 1] = T(0.f);
      } else {
        for (int64_t d = 0; d < D; ++d) std::memset(kt + d * Lp + L, 0, (Lp - L) * sizeof(T));
      }
      for (int64_t j = 0; j < L; ++j) {
        const T* kj = pk + (start + j) * skt + h * skh;
        if (vnni) {
          for (int64_t d = 0; d < D; ++d) kt[((d >> 1) * Lp + j) * 2 + (d & 1)] = kj[d];
        } else {
          for (int64_t d = 0; d < D; ++d) kt[d * Lp + j] = kj[d];
        }
      }
      if (vnni) {  // V in VNNI pairs of keys: vt[((j / 2) * D + d) * 2 + j % 2] = v[j, d]
        T* vt = vpack + (base[b] * HKV + h * Lp) * D;
        // Zero from the first pair that holds a pad key (its odd half when L is odd) to the end.
        std::memset(vt + (L >> 1) * D * 2, 0, (Lp * D - (L >> 1) * D * 2) * sizeof(T));
        for (int64_t j = 0; j < L; ++j) {
          const T* vj = pv + (start + j) * svt + h * svh;
          T* row = vt + (j >> 1) * D * 2 + (j & 1);
          for (int64_t d = 0; d < D; ++d) row[d * 2] = vj[d];
        }
      }
    }
  });
  // Phase 2: work items, longest processing time first onto the least-loaded thread. An item's keys: [k0, k1).
  struct Item { int64_t b, h, m0, k0, k1, cost; };
  const int64_t rows = band.block_rows(QB2);
  std::vector<Item> items;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = cu[b + 1] - cu[b], Lp = base[b + 1] - base[b];
    for (int64_t m0 = 0; m0 < L; m0 += rows) {
      const int64_t R = std::min(rows, L - m0);
      const int64_t k0 = band.lo(m0) / KPAD * KPAD;
      const int64_t k1 = std::min(Lp, (band.hi(m0 + R - 1, L) + KPAD - 1) / KPAD * KPAD);
      for (int64_t h = 0; h < HKV; ++h) items.push_back({b, h, m0, k0, k1, R * (k1 - k0 + D)});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items.size()));
  std::vector<std::vector<int64_t>> assigned(threads);
  std::vector<int64_t> load(threads, 0);
  for (size_t i = 0; i < items.size(); ++i) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    assigned[t].push_back(i);
    load[t] += items[i].cost;
  }
  const float fscale = static_cast<float>(scale), fcap = static_cast<float>(softcap);
  const float fscale_cap = softcap > 0 ? static_cast<float>(scale / softcap) : 0.f;
  // With a softcap the scores are capped in place (scale included), so the exponent takes them unscaled.
  const float escale = softcap > 0 ? 1.f : fscale;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> a, pb, pl;
    std::vector<float> sb, ob, inv;
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t index : assigned[t]) {
        const Item item = items[index];
        const int64_t start = cu[item.b], L = cu[item.b + 1] - start, Lp = base[item.b + 1] - base[item.b];
        const int64_t R = std::min(rows, L - item.m0), M = R * G;
        const int64_t k0 = item.k0, N = item.k1 - item.k0;
        // A: [M, De], row r * G + g = q[start + m0 + r, h * G + g, :] (zero in the VNNI pad column).
        a.resize(M * De);
        for (int64_t r = 0; r < R; ++r)
          for (int64_t g = 0; g < G; ++g) {
            T* row = a.data() + (r * G + g) * De;
            std::memcpy(row, pq + (start + item.m0 + r) * sqt + (item.h * G + g) * sqh, D * sizeof(T));
            if (De > D) row[D] = T(0.f);
          }
        // Packed K^T is [De, Lp] (fp32) or [De / 2, Lp, 2] (VNNI): the span's columns start k0 keys in, rows
        // keep the stride Lp.
        const T* kt = kpack + (base[item.b] * HKV + item.h * Lp) * De + k0 * (vnni ? 2 : 1);
        sb.resize(M * N);
        at::native::cpublas::brgemm(M, N, De, De, Lp, N, false, a.data(), kt, sb.data(), vnni);
        // exp(scale * (s - max)) over each row's keys [lo, hi) of the span, unnormalised (the row's 1 / sum is
        // applied to the output). Whole vectors only: S and P rows have N columns (a multiple of KPAD, itself a
        // multiple of VS), and the lanes of keys outside [lo, hi) are masked (-inf for the max, 0 for the exps), so
        // no scalar tail loop runs (scalar exps measured 10% of a short-sequence call); whole vectors outside the
        // range are not computed, only zeroed in P. fp32 P is S itself, read over the span's real keys only.
        const bool split = vnni && fp32_probs;
        if (vnni) pb.resize(M * N);
        if (split) pl.resize(M * N);
        inv.resize(M);
        const Vec vs(escale), vscale_cap(fscale_cap), vcap(fcap), zero(0.f),
            neg_inf(-std::numeric_limits<float>::infinity());
        for (int64_t r = 0; r < M; ++r) {
          float* s = sb.data() + r * N;
          const int64_t i = item.m0 + r / G, lo = band.lo(i) - k0, hi = band.hi(i, L) - k0;
          const int64_t v0 = lo / VS * VS, v1 = (hi + VS - 1) / VS * VS;
          Vec vm = neg_inf;
          for (int64_t j = v0; j < v1; j += VS) {
            Vec x = Vec::loadu(s + j);
            if (softcap > 0) {
              x = soft_cap(x, vscale_cap, vcap);
              x.store(s + j);
            }
            if (j < lo || j + VS > hi) x = Vec::blendv(neg_inf, x, lanes_in(j, lo, hi));
            vm = at::vec::maximum(vm, x);
          }
          const Vec vmax(at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, vm));
          Vec vsum(0.f);
          T* p = vnni ? pb.data() + r * N : nullptr;
          for (int64_t j = v0; j < v1; j += VS) {
            Vec e = ((Vec::loadu(s + j) - vmax) * vs).exp_u20();
            if (j < lo || j + VS > hi) e = Vec::blendv(zero, e, lanes_in(j, lo, hi));
            if (split) {  // P = hi + lo, both bf16: P @ V to ~16 bits of P, in two bf16 passes
              const Vec high = round_f(e, static_cast<const BFloat16*>(nullptr));
              store_f(p + j, high);
              store_f(pl.data() + r * N + j, e - high);
            } else if (vnni) {
              store_f(p + j, e);
            } else {
              e.store(s + j);
            }
            vsum = vsum + e;
          }
          const auto clear = [&](int64_t from, int64_t to) {
            for (int64_t j = from; j < to; j += VS) {
              if (vnni) {
                store_f(p + j, zero);
              } else {
                zero.store(s + j);
              }
              if (split) store_f(pl.data() + r * N + j, zero);
            }
          };
          clear(0, v0);
          clear(v1, N);
          inv[r] = 1.f / at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, vsum);
        }
        ob.resize(M * D);
        if constexpr (vnni) {  // the span's V rows: VNNI pairs of keys from k0 (even) on
          const T* vt = vpack + (base[item.b] * HKV + item.h * Lp) * D + k0 * D;
          at::native::cpublas::brgemm(M, D, N, N, D, D, false, pb.data(), vt, ob.data(), true);
          if (split) at::native::cpublas::brgemm(M, D, N, N, D, D, true, pl.data(), vt, ob.data(), true);
        } else {  // fp32 V is read in place: the span's real keys, [n, D] rows at the token stride
          const int64_t n = std::min(item.k1, L) - k0;
          at::native::cpublas::brgemm(M, D, n, N, svt, D, false, sb.data(), pv + (start + k0) * svt + item.h * svh,
                                      ob.data(), false);
        }
        for (int64_t r = 0; r < R; ++r)
          for (int64_t g = 0; g < G; ++g) {
            T* orow = po + (start + item.m0 + r) * sot + (item.h * G + g) * soh;
            const float* src = ob.data() + (r * G + g) * D;
            const float w = inv[r * G + g];
            const Vec vw(w);
            int64_t d = 0;
            for (; d + VS <= D; d += VS) store_f(orow + d, Vec::loadu(src + d) * vw);
            for (; d < D; ++d) orow[d] = static_cast<T>(src[d] * w);
          }
      }
    }
    at::native::cpublas::brgemm_release(vnni);
  });
}

// kernel: "auto" (brgemm where available, else portable), "brgemm" (an error where it is not available) or
// "portable" (the plain kernel above, e.g. to test it). The caller passes the user's choice (Python's settings).
template <typename T>
bool use_brgemm(c10::string_view kernel) {
  TORCH_CHECK(kernel == "auto" || kernel == "brgemm" || kernel == "portable",
              "varlen_attention kernel must be auto, brgemm or portable, got ", kernel);
  if (kernel == "portable") return false;
  const bool available = brgemm_available<T>();
  TORCH_CHECK(available || kernel == "auto",
              "the brgemm attention kernel is not available on this CPU for this dtype; use kernel auto or portable");
  return available;
}

// causal: query i sees keys j <= i only; window > 0: only keys with |i - j| < window (0: no window); softcap > 0:
// scores become softcap * tanh(score / softcap) before the softmax (0: none). The defaults are bidirectional
// attention over the whole sequence, and then both kernels run exactly as without these arguments.
void varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
                      double scale, at::Tensor out, bool fp32_probs, c10::string_view kernel, bool causal,
                      int64_t window, double softcap) {
  check_cpu_float(q, "q");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&k, &v, &out}) check_same(q, *t, "k/v/out");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && out.sizes() == q.sizes(),
              "q / out [T, HQ, D], k / v [T, HKV, D]");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2), "q and k disagree in tokens or head_dim");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1 && cu_seqlens.device().is_cpu(),
              "cu_seqlens must be a 1-D CPU tensor");
  const auto cu_long = cu_seqlens.to(at::kLong).contiguous();
  std::vector<int64_t> cu(cu_long.data_ptr<int64_t>(), cu_long.data_ptr<int64_t>() + cu_long.numel());
  TORCH_CHECK(cu.front() == 0 && cu.back() == q.size(0), "cu_seqlens must run from 0 to T");
  for (size_t i = 1; i < cu.size(); ++i) TORCH_CHECK(cu[i] >= cu[i - 1], "cu_seqlens must be non-decreasing");
  TORCH_CHECK(window >= 0, "window must be a positive number of tokens, or 0 for none; got ", window);
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), "softcap must be a positive number, or 0 for none; got ",
              softcap);
  const Band band{causal, window};
  if (q.scalar_type() == at::kFloat) {
    if (use_brgemm<float>(kernel)) {
      varlen_attention_brgemm<float>(q, k, v, cu, scale, false, band, softcap, out);
    } else {
      varlen_attention_kernel<float>(q, k, v, cu, scale, band, softcap, out);
    }
  } else if (use_brgemm<BFloat16>(kernel)) {
    varlen_attention_brgemm<BFloat16>(q, k, v, cu, scale, fp32_probs, band, softcap, out);
  } else {
    varlen_attention_kernel<BFloat16>(q, k, v, cu, scale, band, softcap, out);
  }
}

int64_t vector_width() { return VS; }

// Whether the brgemm attention kernel can run for inputs of this dtype here (llm2vec_fast/backends.py asks).
bool brgemm_attention_available(at::ScalarType dtype) {
  if (dtype == at::kFloat) return brgemm_available<float>();
  if (dtype == at::kBFloat16) return brgemm_available<BFloat16>();
  return false;
}

}  // namespace

TORCH_LIBRARY(llm2vec_fast, m) {
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps, bool gemma, Tensor(a!) out, "
        "Tensor(b!)? sum_out) -> ()");
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor(a!) q_out, Tensor(b!) k_out) -> ()");
  m.def("silu_mul(Tensor gate, Tensor up, Tensor(a!) out, bool round_act=True) -> ()");
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale, Tensor(a!) out, "
        "bool fp32_probs=False, str kernel=\"auto\", bool causal=False, int window=0, float softcap=0.0) -> ()");
  m.def("vector_width() -> int", &vector_width);
  m.def("brgemm_attention_available(ScalarType dtype) -> bool", &brgemm_attention_available);
}

TORCH_LIBRARY_IMPL(llm2vec_fast, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary", &rotary);
  m.impl("silu_mul", &silu_mul);
  m.impl("varlen_attention", &varlen_attention);
}

#ifdef LLM2VEC_FAST_PYTHON_MODULE
// setup.py builds this file as the Python module llm2vec_fast._C: importing it registers the ops above.
#include <Python.h>
static struct PyModuleDef llm2vec_fast_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&llm2vec_fast_c_module); }
#endif
