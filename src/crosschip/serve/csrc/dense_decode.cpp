// crosschip: one whole decode step of a Llama-style decoder (RMSNorm, RoPE, GQA attention over the paged
// KV cache, SwiGLU) on the CPU in float32, as a single call from Python.
//
// Why: at batch 1 a decode step of DenseRunner's torch path is ~50 small ops per layer, each paying 5-10 us
// of dispatch, about as long as the step's weight reads. Here the weights are streamed once per step by
// register-tiled dot products split across torch's intra-op threads (at::parallel_for), and everything
// between two projections is a plain loop over a few thousand floats.
//
// Numerics: each output element is one fixed chain of multiply-adds over k (kLanes lanes, then the lanes
// summed in order), whatever the batch size and tiling, so a sequence's logits are bitwise the same
// whichever other sequences share its step.
//
// Portable: GCC/Clang vector extensions, no intrinsics; compiled on the machine that runs it
// (serve/cpu_kernel.py), so -march=native vectorises for that CPU (AVX2/AVX-512 on x86, NEON/SVE on Arm).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int kLanes = 8;
constexpr int64_t kStreamRows = 8;  // batches below this walk the weight as 4 long streams per thread (`linear`)
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float vec_u __attribute__((vector_size(kLanes * sizeof(float)), aligned(alignof(float))));

inline vec load(const float* p) { return *reinterpret_cast<const vec_u*>(p); }

inline float lane_sum(vec v) {
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += v[j];
  return s;
}

// A projection y = x @ w^T + b with w [out, in] row-major; b may be null.
struct Linear {
  const float* w = nullptr;
  const float* b = nullptr;
  int64_t out = 0, in = 0;
};

// y[c * ldy + rows[i]] = (accumulate ? y : 0) + (w[rows[i]] . x[c] + b[rows[i]]) for R weight rows and C input
// rows. R * C accumulators stay in registers; each weight vector loaded serves C rows of x.
template <int R, int C>
inline void tile(const Linear& lin, const int64_t* rows, const float* __restrict x, float* __restrict y,
                 bool accumulate) {
  const int64_t k_dim = lin.in;
  const float* w[R];
  for (int r = 0; r < R; ++r) w[r] = lin.w + rows[r] * k_dim;
  vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = vec{};
  int64_t k = 0;
  for (; k + kLanes <= k_dim; k += kLanes) {
    vec xv[C];
    for (int c = 0; c < C; ++c) xv[c] = load(x + c * k_dim + k);
    for (int r = 0; r < R; ++r) {
      const vec wv = load(w[r] + k);
      for (int c = 0; c < C; ++c) acc[r][c] += wv * xv[c];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      float s = lane_sum(acc[r][c]);
      for (int64_t t = k; t < k_dim; ++t) s += w[r][t] * x[c * k_dim + t];
      if (lin.b != nullptr) s += lin.b[rows[r]];
      float& out = y[c * lin.out + rows[r]];
      out = accumulate ? out + s : s;
    }
  }
}

// Weight rows `rows[0..R)` against all `batch` rows of x [batch, in], into y [batch, out].
template <int R>
inline void row_group(const Linear& lin, const int64_t* rows, const float* x, int64_t batch, float* y,
                      bool accumulate) {
  int64_t c = 0;
  for (; c + 2 <= batch; c += 2) tile<R, 2>(lin, rows, x + c * lin.in, y + c * lin.out, accumulate);
  for (; c < batch; ++c) tile<R, 1>(lin, rows, x + c * lin.in, y + c * lin.out, accumulate);
}

// y [batch, out] (+)= x [batch, in] @ w^T + b, the weight read once for the whole batch. Each intra-op thread
// takes a contiguous quarter-aligned slice of rows and walks it as 4 long sequential streams (rows
// lo + i, lo + q + i, lo + 2q + i, lo + 3q + i): on a 2-core EPYC that streams short rows (in = 512) at ~37 GB/s,
// where 4 adjacent rows at a time (4 streams of 2 KB, restarted every tile) reach ~27 GB/s.
void linear(const Linear& lin, const float* x, int64_t batch, float* y, bool accumulate) {
  const int64_t quads = lin.out / 4;
  at::parallel_for(0, quads, 1, [&](int64_t lo, int64_t hi) {
    // From kStreamRows rows of x on, the tile is compute-bound: 4 adjacent rows then stay in L1 for all of x.
    const bool streams = batch < kStreamRows;
    const int64_t q = hi - lo, first = 4 * lo;
    for (int64_t i = 0; i < q; ++i) {
      const int64_t rows[4] = {first + i, first + q + i, first + 2 * q + i, first + 3 * q + i};
      const int64_t adjacent[4] = {first + 4 * i, first + 4 * i + 1, first + 4 * i + 2, first + 4 * i + 3};
      row_group<4>(lin, streams ? rows : adjacent, x, batch, y, accumulate);
    }
  });
  for (int64_t r = quads * 4; r < lin.out; ++r) row_group<1>(lin, &r, x, batch, y, accumulate);
}

// out = w * (x * rsqrt(mean(x^2) + eps)), HF's LlamaRMSNorm in float32.
void rms_norm(const float* x, const float* w, int64_t dim, float eps, float* out) {
  float ss = 0.f;
  for (int64_t k = 0; k < dim; ++k) ss += x[k] * x[k];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
  for (int64_t k = 0; k < dim; ++k) out[k] = w[k] * (x[k] * inv);
}

float dot(const float* a, const float* b, int64_t n) {
  vec acc = vec{};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) acc += load(a + k) * load(b + k);
  float s = lane_sum(acc);
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

// y += a * x over n floats.
void axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
  int64_t i = 0;
  const vec av = vec{} + a;
  for (; i + kLanes <= n; i += kLanes) {
    const vec r = load(y + i) + av * load(x + i);
    *reinterpret_cast<vec_u*>(y + i) = r;
  }
  for (; i < n; ++i) y[i] += a * x[i];
}

// s = exp(s - max(s)) in place; returns the sum (the softmax's denominator).
float softmax_unnormalised(float* s, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) top = std::max(top, s[t]);
  float total = 0.f;
  for (int64_t t = 0; t < n; ++t) total += (s[t] = std::exp(s[t] - top));
  return total;
}

const float* data_or_null(const torch::Tensor& t) { return t.numel() == 0 ? nullptr : t.data_ptr<float>(); }

void check_f32(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), what,
              " must be a contiguous float32 CPU tensor");
}

Linear make_linear(const torch::Tensor& w, const torch::Tensor& b, int64_t in, const char* what) {
  check_f32(w, what);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == in, what, ": weight must be [out, ", in, "], got ", w.sizes());
  if (b.numel() != 0) {
    check_f32(b, what);
    TORCH_CHECK(b.dim() == 1 && b.size(0) == w.size(0), what, ": bias must be [", w.size(0), "]");
  }
  return Linear{w.data_ptr<float>(), data_or_null(b), w.size(0), w.size(1)};
}

struct Layer {
  const float* norm1;
  const float* norm2;
  float eps1, eps2;
  Linear qkv, o, gate_up, down;
};

constexpr int kTensorsPerLayer = 10;  // norm1, qkv w/b, o w/b, norm2, gate_up w/b, down w/b
constexpr int64_t kSiluGrain = 2;  // batch rows per SiLU task
constexpr int64_t kAttentionGrain = 1 << 16;  // multiply-adds per attention task before threads are used

class DenseDecode {
 public:
  DenseDecode(torch::Tensor embed, std::vector<torch::Tensor> layer_tensors, std::vector<double> layer_eps,
              torch::Tensor final_norm, double final_eps, torch::Tensor lm_w, torch::Tensor lm_b, torch::Tensor cos,
              torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache, int64_t n_heads, int64_t n_kv,
              int64_t head_dim, int64_t block_size, double scale, bool release_gil)
      : held_(layer_tensors),
        release_gil_(release_gil),
        n_heads_(n_heads), n_kv_(n_kv), head_dim_(head_dim), block_size_(block_size),
        scale_(static_cast<float>(scale)), final_eps_(static_cast<float>(final_eps)) {
    check_f32(embed, "embed");
    dim_ = embed.size(1);
    vocab_ = embed.size(0);
    TORCH_CHECK(n_heads > 0 && n_kv > 0 && n_heads % n_kv == 0 && head_dim > 0 && head_dim % 2 == 0,
                "bad head counts");
    TORCH_CHECK(layer_tensors.size() % kTensorsPerLayer == 0 &&
                    layer_eps.size() * kTensorsPerLayer == 2 * layer_tensors.size(),
                "expected 10 tensors and 2 eps per layer");
    const int64_t n_layers = static_cast<int64_t>(layer_tensors.size()) / kTensorsPerLayer;
    const int64_t q_out = (n_heads + 2 * n_kv) * head_dim;
    for (int64_t l = 0; l < n_layers; ++l) {
      const torch::Tensor* t = layer_tensors.data() + l * kTensorsPerLayer;
      check_f32(t[0], "norm1");
      check_f32(t[5], "norm2");
      TORCH_CHECK(t[0].numel() == dim_ && t[5].numel() == dim_, "norm weights must be [dim]");
      Layer layer{t[0].data_ptr<float>(), t[5].data_ptr<float>(), static_cast<float>(layer_eps[2 * l]),
                  static_cast<float>(layer_eps[2 * l + 1]), make_linear(t[1], t[2], dim_, "qkv"),
                  make_linear(t[3], t[4], n_heads * head_dim, "o"), make_linear(t[6], t[7], dim_, "gate_up"),
                  Linear{}};
      TORCH_CHECK(layer.qkv.out == q_out && layer.o.out == dim_ && layer.gate_up.out % 2 == 0,
                  "layer ", l, ": projection shapes do not match the head counts");
      layer.down = make_linear(t[8], t[9], layer.gate_up.out / 2, "down");
      TORCH_CHECK(layer.down.out == dim_, "layer ", l, ": down must be [dim, intermediate]");
      layers_.push_back(layer);
    }
    check_f32(final_norm, "final norm");
    lm_head_ = make_linear(lm_w, lm_b, dim_, "lm_head");
    for (const torch::Tensor* t : {&cos, &sin}) {
      check_f32(*t, "rope table");
      TORCH_CHECK(t->dim() == 2 && t->size(1) == head_dim && t->size(0) == cos.size(0),
                  "rope tables must be [T, head_dim]");
    }
    for (const torch::Tensor* t : {&k_cache, &v_cache}) {
      check_f32(*t, "kv cache");
      TORCH_CHECK(t->dim() == 4 && t->size(0) == n_layers && t->size(2) == n_kv && t->size(3) == head_dim &&
                      t->size(1) % block_size == 0 && t->sizes() == k_cache.sizes(),
                  "kv caches must be [layers, blocks * block_size, kv_heads, head_dim]");
    }
    embed_ = embed;
    final_norm_ = final_norm;
    lm_w_ = lm_w;
    lm_b_ = lm_b;
    cos_ = cos;
    sin_ = sin;
    k_cache_ = k_cache;
    v_cache_ = v_cache;
    kc_ = k_cache_.data_ptr<float>();
    vc_ = v_cache_.data_ptr<float>();
    cache_rows_ = k_cache_.size(1);
  }

  // One decode token per sequence: tokens [B] long, tables [B, nb] long (block ids, position order), lens [B]
  // (context length once this token is cached; its position is lens - 1). Writes K/V, returns logits [B, V].
  torch::Tensor decode(torch::Tensor tokens, torch::Tensor tables, std::vector<int64_t> lens) {
    const int64_t batch = static_cast<int64_t>(lens.size());
    TORCH_CHECK(tokens.device().is_cpu() && tokens.scalar_type() == torch::kLong && tokens.is_contiguous() &&
                    tokens.numel() == batch, "tokens must be a [B] long CPU tensor");
    TORCH_CHECK(tables.device().is_cpu() && tables.scalar_type() == torch::kLong && tables.is_contiguous() &&
                    tables.dim() == 2 && tables.size(0) == batch, "tables must be a [B, blocks] long CPU tensor");
    const int64_t* tok = tokens.data_ptr<int64_t>();
    const int64_t* tab = tables.data_ptr<int64_t>();
    const int64_t width = tables.size(1);
    const int64_t num_blocks = k_cache_.size(1) / block_size_;
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(tok[b] >= 0 && tok[b] < vocab_, "token id ", tok[b], " out of range");
      TORCH_CHECK(lens[b] >= 1 && lens[b] <= cos_.size(0) && lens[b] <= width * block_size_,
                  "context length ", lens[b], " out of range");
      for (int64_t i = 0; i < (lens[b] + block_size_ - 1) / block_size_; ++i)
        TORCH_CHECK(tab[b * width + i] >= 0 && tab[b * width + i] < num_blocks, "block id out of range");
    }
    torch::Tensor logits = torch::empty({batch, lm_head_.out}, torch::kFloat32);
    if (release_gil_) {
      pybind11::gil_scoped_release no_gil;  // the server's event loop runs beside the step, on a spare core
      run(tok, tab, width, lens, logits.data_ptr<float>());
    } else {
      run(tok, tab, width, lens, logits.data_ptr<float>());
    }
    return logits;
  }

 private:
  int64_t row_of(const int64_t* table, int64_t pos) const {
    return table[pos / block_size_] * block_size_ + pos % block_size_;
  }

  void run(const int64_t* tok, const int64_t* tab, int64_t width, const std::vector<int64_t>& lens,
           float* logits) {
    const int64_t batch = static_cast<int64_t>(lens.size());
    const int64_t q_dim = n_heads_ * head_dim_;
    std::vector<float> x(batch * dim_), h(batch * dim_), attn(batch * q_dim);
    for (int64_t b = 0; b < batch; ++b)
      std::copy_n(embed_.data_ptr<float>() + tok[b] * dim_, dim_, x.data() + b * dim_);
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& layer = layers_[l];
      for (int64_t b = 0; b < batch; ++b)
        rms_norm(x.data() + b * dim_, layer.norm1, dim_, layer.eps1, h.data() + b * dim_);
      std::vector<float> qkv(batch * layer.qkv.out);
      linear(layer.qkv, h.data(), batch, qkv.data(), false);
      rope_and_cache(static_cast<int64_t>(l), qkv.data(), tab, width, lens);
      attention(static_cast<int64_t>(l), qkv.data(), tab, width, lens, attn.data());
      linear(layer.o, attn.data(), batch, x.data(), true);  // x += o(attn)
      for (int64_t b = 0; b < batch; ++b)
        rms_norm(x.data() + b * dim_, layer.norm2, dim_, layer.eps2, h.data() + b * dim_);
      const int64_t inter = layer.down.in;
      std::vector<float> gate_up(batch * 2 * inter), act(batch * inter);
      linear(layer.gate_up, h.data(), batch, gate_up.data(), false);
      at::parallel_for(0, batch, kSiluGrain, [&](int64_t lo, int64_t hi) {  // threads from a few rows on
        for (int64_t b = lo; b < hi; ++b) {
          const float* g = gate_up.data() + b * 2 * inter;
          for (int64_t i = 0; i < inter; ++i) act[b * inter + i] = g[i] / (1.f + std::exp(-g[i])) * g[inter + i];
        }
      });
      linear(layer.down, act.data(), batch, x.data(), true);  // x += down(silu(gate) * up)
    }
    for (int64_t b = 0; b < batch; ++b)
      rms_norm(x.data() + b * dim_, final_norm_.data_ptr<float>(), dim_, final_eps_, h.data() + b * dim_);
    linear(lm_head_, h.data(), batch, logits, false);
  }

  // RoPE on the q and k heads of qkv [B, H + 2 Hkv, Dh] at each sequence's position (HF's rotate_half form,
  // with the sign folded into `sin`), then k and v into the layer's cache rows.
  void rope_and_cache(int64_t layer, float* qkv, const int64_t* tab, int64_t width,
                      const std::vector<int64_t>& lens) {
    const int64_t heads = n_heads_ + 2 * n_kv_, half = head_dim_ / 2;
    std::vector<float> tmp(head_dim_);
    for (size_t b = 0; b < lens.size(); ++b) {
      const int64_t pos = lens[b] - 1;
      const float* c = cos_.data_ptr<float>() + pos * head_dim_;
      const float* s = sin_.data_ptr<float>() + pos * head_dim_;
      float* seq = qkv + b * heads * head_dim_;
      for (int64_t hd = 0; hd < n_heads_ + n_kv_; ++hd) {
        float* v = seq + hd * head_dim_;
        for (int64_t i = 0; i < half; ++i) tmp[i] = v[i] * c[i] + v[i + half] * s[i];
        for (int64_t i = half; i < head_dim_; ++i) tmp[i] = v[i] * c[i] + v[i - half] * s[i];
        std::copy(tmp.begin(), tmp.end(), v);
      }
      const int64_t row = row_of(tab + b * width, pos);
      const int64_t kv_width = n_kv_ * head_dim_;
      std::copy_n(seq + n_heads_ * head_dim_, kv_width, cache(kc_, layer, row));
      std::copy_n(seq + (n_heads_ + n_kv_) * head_dim_, kv_width, cache(vc_, layer, row));
    }
  }

  float* cache(float* base, int64_t layer, int64_t row) const {
    return base + ((layer * cache_rows_ + row) * n_kv_) * head_dim_;
  }

  // softmax(q k^T * scale) v for every (sequence, query head) over the sequence's cached positions. One task
  // per (sequence, KV head): the query heads of its group read each cached K/V row once between them.
  void attention(int64_t layer, const float* qkv, const int64_t* tab, int64_t width,
                 const std::vector<int64_t>& lens, float* out) const {
    const int64_t heads = n_heads_ + 2 * n_kv_, group = n_heads_ / n_kv_;
    const int64_t batch = static_cast<int64_t>(lens.size());
    int64_t longest = 1;
    for (int64_t len : lens) longest = std::max(longest, len);
    // Threads only for enough work: a fork/join costs more than a few short contexts' dot products.
    const int64_t grain = std::max<int64_t>(1, kAttentionGrain / (longest * head_dim_ * group));
    at::parallel_for(0, batch * n_kv_, grain, [&](int64_t lo, int64_t hi) {
      std::vector<float> scores;
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / n_kv_, kv = task % n_kv_, len = lens[b];
        const float* q = qkv + (b * heads + kv * group) * head_dim_;  // the group's query heads, [G, Dh]
        const int64_t* table = tab + b * width;
        scores.assign(group * len, 0.f);  // [G, T]
        for (int64_t t = 0; t < len; ++t) {
          const float* k = cache(kc_, layer, row_of(table, t)) + kv * head_dim_;
          for (int64_t g = 0; g < group; ++g) scores[g * len + t] = dot(q + g * head_dim_, k, head_dim_) * scale_;
        }
        float* o = out + (b * n_heads_ + kv * group) * head_dim_;  // [G, Dh]
        std::fill_n(o, group * head_dim_, 0.f);
        std::vector<float> inv(group);
        for (int64_t g = 0; g < group; ++g) inv[g] = 1.f / softmax_unnormalised(scores.data() + g * len, len);
        for (int64_t t = 0; t < len; ++t) {
          const float* v = cache(vc_, layer, row_of(table, t)) + kv * head_dim_;
          for (int64_t g = 0; g < group; ++g) axpy(scores[g * len + t], v, o + g * head_dim_, head_dim_);
        }
        for (int64_t g = 0; g < group; ++g)
          for (int64_t i = 0; i < head_dim_; ++i) o[g * head_dim_ + i] *= inv[g];
      }
    });
  }

  std::vector<torch::Tensor> held_;  // keeps the layers' tensors alive while `layers_` points into them
  bool release_gil_;
  std::vector<Layer> layers_;
  Linear lm_head_;
  torch::Tensor embed_, final_norm_, lm_w_, lm_b_, cos_, sin_, k_cache_, v_cache_;
  float* kc_ = nullptr;  // the caches' data, [layers, cache_rows_, n_kv_, head_dim_]
  float* vc_ = nullptr;
  int64_t cache_rows_ = 0;
  int64_t dim_ = 0, vocab_ = 0, n_heads_, n_kv_, head_dim_, block_size_;
  float scale_, final_eps_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<DenseDecode>(m, "DenseDecode")
      .def(pybind11::init<torch::Tensor, std::vector<torch::Tensor>, std::vector<double>, torch::Tensor, double,
                          torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                          int64_t, int64_t, int64_t, int64_t, double, bool>())
      .def("decode", &DenseDecode::decode);
}
