// Host-only check of cuda/flash_attention.cu's index math (no GPU needed):
//   g++ -std=c++17 -O2 -Icsrc tests/flash_emulation.cpp -o /tmp/flash_emulation && /tmp/flash_emulation
// 1. The ldmatrix addresses of cuda/mma_fragments.h, fed to an emulated ldmatrix (PTX ISA
//    semantics), give exactly the mma.m16n8k16 A / B fragments the tables say; a_from_c turns
//    score fragments into the A fragment of the same 16x16 block.
// 2. The three kernels, emulated warp by warp and lane by lane with the same tiles, fragment
//    maps, masks, block loops and rounding points (emulated ldmatrix and mma), match a float64
//    causal attention (forward, dq, dk, dv) within bf16 tolerance, odd T and grouped heads.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda/mma_fragments.h"

using namespace palmcore;
using namespace palmcore::cuda::mma;

namespace {

constexpr int kBlock = 64, kWarps = 4, kScoreTiles = 8, kScoreSteps = 4;
int failures = 0;

void check(bool ok, const char* what) {
  if (!ok && failures++ < 20) std::printf("FAIL: %s\n", what);
}

uint16_t bits_of(float x) { return to_bf16(x).bits; }
float value_of(uint16_t b) { return from_bf16(bf16{b}); }

// A padded shared tile: kBlock rows of D (+8) bf16.
struct Tile {
  int D, stride;
  std::vector<uint16_t> e;
  explicit Tile(int D_) : D(D_), stride(D_ + 8), e(kBlock * (D_ + 8), 0xffff) {}  // NaN: unwritten
  const uint16_t* at(int r, int c) const { return &e[r * stride + c]; }
};

// load_tile: rows row0.. of a [T, ld] bf16 matrix (columns col0..), zeros past T.
void load_tile(Tile& t, const std::vector<uint16_t>& src, int64_t ld, int64_t col0, int row0, int T) {
  for (int r = 0; r < kBlock; ++r)
    for (int c = 0; c < t.D; ++c)
      t.e[r * t.stride + c] = row0 + r < T ? src[(row0 + r) * ld + col0 + c] : 0;
}

using Regs = uint32_t[32][4];
enum class Addr { A, B };

// ldmatrix.x4 (.trans when trans): lane l gives the address of row (l % 8) of matrix l / 8.
void ldsm(Regs& out, const Tile& t, int r0, int c0, Addr addr, bool trans) {
  auto row_ptr = [&](int l) {
    return addr == Addr::A ? t.at(r0 + ldsm_a_row(l), c0 + ldsm_a_col(l)) : t.at(r0 + ldsm_b_row(l), c0 + ldsm_b_col(l));
  };
  for (int lane = 0; lane < 32; ++lane)
    for (int m = 0; m < 4; ++m) {
      uint32_t reg = 0;
      for (int e = 0; e < 2; ++e) {
        const uint16_t x = trans ? row_ptr(8 * m + 2 * (lane % 4) + e)[lane / 4] : row_ptr(8 * m + lane / 4)[2 * (lane % 4) + e];
        reg |= static_cast<uint32_t>(x) << (16 * e);
      }
      out[lane][m] = reg;
    }
}

// mma.m16n8k16: c += A · B, A and B rebuilt from the lanes' registers by the fragment tables.
void mma(float (&c)[32][4], const Regs& a, const uint32_t (&b)[32][2]) {
  float A[16][16], B[16][8];
  int seen_a[16][16] = {}, seen_b[16][8] = {};
  for (int lane = 0; lane < 32; ++lane)
    for (int e = 0; e < 2; ++e) {
      for (int r = 0; r < 4; ++r) {
        A[a_row(lane, r)][a_col(lane, r, e)] = value_of(static_cast<uint16_t>(a[lane][r] >> (16 * e)));
        ++seen_a[a_row(lane, r)][a_col(lane, r, e)];
      }
      for (int r = 0; r < 2; ++r) {
        B[b_k(lane, r, e)][b_n(lane)] = value_of(static_cast<uint16_t>(b[lane][r] >> (16 * e)));
        ++seen_b[b_k(lane, r, e)][b_n(lane)];
      }
    }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) check(seen_a[i][j] == 1, "A fragment covers each element once");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) check(seen_b[i][j] == 1, "B fragment covers each element once");
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      float s = c[lane][i];
      for (int k = 0; k < 16; ++k) s += A[c_row(lane, i)][k] * B[k][c_col(lane, i)];
      c[lane][i] = s;
    }
}

void mma_pair(float (&c0)[32][4], float (&c1)[32][4], const Regs& a, const Regs& b) {
  uint32_t lo[32][2], hi[32][2];
  for (int lane = 0; lane < 32; ++lane) {
    lo[lane][0] = b[lane][0], lo[lane][1] = b[lane][1], hi[lane][0] = b[lane][2], hi[lane][1] = b[lane][3];
  }
  mma(c0, a, lo);
  mma(c1, a, hi);
}

// A warp's 16 x kBlock scores (per lane: [n][e]) and 16 x D accumulators.
using Scores = float[kScoreTiles][32][4];
using Acc = std::vector<std::array<std::array<float, 4>, 32>>;  // [D / 8][lane][e]

// scores: c = A(rows a_r0.. of a_tile) · b_tileᵀ over D; A from `a_regs(ks)` when given.
void scores(Scores& c, const Tile* a_tile, int a_r0, const std::vector<Regs>* a_regs, const Tile& b_tile) {
  for (auto& n : c)
    for (auto& l : n)
      for (float& x : l) x = 0.0f;
  for (int ks = 0; ks < b_tile.D / 16; ++ks) {
    Regs a;
    if (a_regs)
      for (int l = 0; l < 32; ++l)
        for (int r = 0; r < 4; ++r) a[l][r] = (*a_regs)[ks][l][r];
    else
      ldsm(a, *a_tile, a_r0, 16 * ks, Addr::A, false);
    for (int np = 0; np < kScoreTiles / 2; ++np) {
      Regs b;
      ldsm(b, b_tile, 16 * np, 16 * ks, Addr::B, false);
      mma_pair(c[2 * np], c[2 * np + 1], a, b);
    }
  }
}

// acc += W · tile (W rounded to bf16 by a_from_c).
void add_weighted_rows(Acc& acc, const Scores& w, const Tile& tile) {
  for (int kk = 0; kk < kScoreSteps; ++kk) {
    Regs a;
    for (int l = 0; l < 32; ++l) {
      float lo[4], hi[4];
      for (int e = 0; e < 4; ++e) lo[e] = w[2 * kk][l][e], hi[e] = w[2 * kk + 1][l][e];
      uint32_t r[4];
      a_from_c(lo, hi, r);
      for (int e = 0; e < 4; ++e) a[l][e] = r[e];
    }
    for (int dp = 0; dp < tile.D / 16; ++dp) {
      Regs b;
      ldsm(b, tile, 16 * kk, 16 * dp, Addr::A, true);
      float c0[32][4], c1[32][4];
      for (int l = 0; l < 32; ++l)
        for (int e = 0; e < 4; ++e) c0[l][e] = acc[2 * dp][l][e], c1[l][e] = acc[2 * dp + 1][l][e];
      mma_pair(c0, c1, a, b);
      for (int l = 0; l < 32; ++l)
        for (int e = 0; e < 4; ++e) acc[2 * dp][l][e] = c0[l][e], acc[2 * dp + 1][l][e] = c1[l][e];
    }
  }
}

// store_row: row half `half` of lane's accumulators into dst (D columns), times factor.
void store_row(std::vector<uint16_t>& dst, int64_t at, const Acc& acc, int lane, int half, float factor) {
  for (size_t n = 0; n < acc.size(); ++n) {
    const uint32_t v = pack_bf16(acc[n][lane][2 * half] * factor, acc[n][lane][2 * half + 1] * factor);
    dst[at + 8 * n + c_col(lane, 2 * half)] = static_cast<uint16_t>(v);
    dst[at + 8 * n + c_col(lane, 2 * half) + 1] = static_cast<uint16_t>(v >> 16);
  }
}

struct Shape {
  int B, T, H, Hkv, D, group, first_head;
  int kv_head(int h) const { return (first_head + h) / group; }
  int blocks() const { return (T + kBlock - 1) / kBlock; }
};

struct Data {
  std::vector<uint16_t> q, k, v, dout, out, dq, dk, dv;
  std::vector<float> lse, row_dot;
};

constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

void forward_cta(const Shape& s, Data& d, int b, int h, int qb) {
  const int D = s.D, T = s.T, g = s.kv_head(h), i0 = qb * kBlock;
  const int64_t qs = int64_t(s.H) * D, ks = int64_t(s.Hkv) * D;
  const float scale = 1.0f / std::sqrt(float(D)), scale_log2 = scale * kLog2e;
  std::vector<uint16_t> qmat(d.q.begin() + int64_t(b) * T * qs, d.q.begin() + int64_t(b + 1) * T * qs);
  std::vector<uint16_t> kmat(d.k.begin() + int64_t(b) * T * ks, d.k.begin() + int64_t(b + 1) * T * ks);
  std::vector<uint16_t> vmat(d.v.begin() + int64_t(b) * T * ks, d.v.begin() + int64_t(b + 1) * T * ks);
  Tile qt(D), kt(D), vt(D);
  load_tile(qt, qmat, qs, int64_t(h) * D, i0, T);
  for (int warp = 0; warp < kWarps; ++warp) {
    std::vector<Regs> qf(D / 16);
    for (int k = 0; k < D / 16; ++k) ldsm(qf[k], qt, 16 * warp, 16 * k, Addr::A, false);
    Acc acc(D / 8);
    for (auto& n : acc)
      for (auto& l : n) l.fill(0.0f);
    float row_max[32][2], row_sum[32][2];
    for (int l = 0; l < 32; ++l) row_max[l][0] = row_max[l][1] = -INFINITY, row_sum[l][0] = row_sum[l][1] = 0.0f;
    for (int kb = 0; kb <= qb; ++kb) {
      load_tile(kt, kmat, ks, int64_t(g) * D, kb * kBlock, T);
      load_tile(vt, vmat, ks, int64_t(g) * D, kb * kBlock, T);
      Scores sc;
      scores(sc, nullptr, 0, &qf, kt);
      for (int l = 0; l < 32; ++l)
        for (int n = 0; n < kScoreTiles; ++n)
          for (int e = 0; e < 4; ++e) {
            const int row_i = i0 + 16 * warp + c_row(l, e);
            const bool masked = kb == qb && kb * kBlock + 8 * n + c_col(l, e) > row_i;
            sc[n][l][e] = masked ? -INFINITY : sc[n][l][e] * scale_log2;
          }
      for (int half = 0; half < 2; ++half) {
        float m[32];
        for (int l = 0; l < 32; ++l) {
          m[l] = row_max[l][half];
          for (int n = 0; n < kScoreTiles; ++n) m[l] = std::fmax(m[l], std::fmax(sc[n][l][2 * half], sc[n][l][2 * half + 1]));
        }
        float m1[32], m2[32];  // quad_max: xor 1 then xor 2
        for (int l = 0; l < 32; ++l) m1[l] = std::fmax(m[l], m[l ^ 1]);
        for (int l = 0; l < 32; ++l) m2[l] = std::fmax(m1[l], m1[l ^ 2]);
        for (int l = 0; l < 32; ++l) {
          const float base = m2[l] == -INFINITY ? 0.0f : m2[l];
          const float alpha = std::exp2(row_max[l][half] - base);
          row_max[l][half] = m2[l];
          float sum = row_sum[l][half] * alpha;
          for (auto& n : acc) n[l][2 * half] *= alpha, n[l][2 * half + 1] *= alpha;
          for (int n = 0; n < kScoreTiles; ++n)
            for (int e = 2 * half; e < 2 * half + 2; ++e) {
              sc[n][l][e] = std::exp2(sc[n][l][e] - base);
              sum += sc[n][l][e];
            }
          row_sum[l][half] = sum;
        }
      }
      add_weighted_rows(acc, sc, vt);
    }
    for (int half = 0; half < 2; ++half) {
      float s1[32], s2[32];
      for (int l = 0; l < 32; ++l) s1[l] = row_sum[l][half] + row_sum[l ^ 1][half];
      for (int l = 0; l < 32; ++l) s2[l] = s1[l] + s1[l ^ 2];
      for (int l = 0; l < 32; ++l) {
        const int i = i0 + 16 * warp + c_row(l, 2 * half);
        if (i >= T) continue;
        store_row(d.out, (int64_t(b) * T + i) * qs + int64_t(h) * D, acc, l, half, 1.0f / s2[l]);
        if (l % 4 == 0) d.lse[(int64_t(b) * s.H + h) * T + i] = row_max[l][half] * kLn2 + std::log(s2[l]);
      }
    }
  }
}

void row_dot(const Shape& s, Data& d) {
  const int64_t qs = int64_t(s.H) * s.D;
  for (int b = 0; b < s.B; ++b)
    for (int h = 0; h < s.H; ++h)
      for (int i = 0; i < s.T; ++i) {
        float lanes[32];
        const int64_t at = (int64_t(b) * s.T + i) * qs + int64_t(h) * s.D;
        for (int l = 0; l < 32; ++l) {
          lanes[l] = 0.0f;
          for (int e = 0; e < s.D / 32; ++e)
            lanes[l] = std::fma(value_of(d.dout[at + l + 32 * e]), value_of(d.out[at + l + 32 * e]), lanes[l]);
        }
        for (int off = 16; off > 0; off /= 2) {
          float next[32];
          for (int l = 0; l < 32; ++l) next[l] = lanes[l] + lanes[l ^ off];
          for (int l = 0; l < 32; ++l) lanes[l] = next[l];
        }
        d.row_dot[(int64_t(b) * s.H + h) * s.T + i] = lanes[0];
      }
}

// The shared part of both backward kernels for one warp and one pair of blocks: p from scores
// of (a rows, b tile) with lse2 / mask given per (lane, n, e), then ds' with D.
template <typename Lse2, typename Masked, typename Dot>
void probabilities_and_gradients(Scores& p, Scores& ds, float scale, Lse2 lse2, Masked masked, Dot dot) {
  const float scale_log2 = scale * kLog2e;
  for (int n = 0; n < kScoreTiles; ++n)
    for (int l = 0; l < 32; ++l)
      for (int e = 0; e < 4; ++e) {
        const float x = std::exp2(std::fma(p[n][l][e], scale_log2, -lse2(l, n, e)));
        p[n][l][e] = masked(l, n, e) ? 0.0f : rounded_bf16(x);
      }
  for (int n = 0; n < kScoreTiles; ++n)
    for (int l = 0; l < 32; ++l)
      for (int e = 0; e < 4; ++e) ds[n][l][e] = rounded_bf16(p[n][l][e] * (ds[n][l][e] - dot(l, n, e)) * scale);
}

std::vector<uint16_t> batch_rows(const std::vector<uint16_t>& m, int b, int T, int64_t ld) {
  return std::vector<uint16_t>(m.begin() + int64_t(b) * T * ld, m.begin() + int64_t(b + 1) * T * ld);
}

void dkdv_cta(const Shape& s, Data& d, int b, int g, int kb) {
  const int D = s.D, T = s.T, j0 = kb * kBlock;
  const int64_t qs = int64_t(s.H) * D, ks = int64_t(s.Hkv) * D;
  const float scale = 1.0f / std::sqrt(float(D));
  const auto qmat = batch_rows(d.q, b, T, qs), dmat = batch_rows(d.dout, b, T, qs);
  Tile kt(D), vt(D), qt(D), dt(D);
  load_tile(kt, batch_rows(d.k, b, T, ks), ks, int64_t(g) * D, j0, T);
  load_tile(vt, batch_rows(d.v, b, T, ks), ks, int64_t(g) * D, j0, T);
  const int64_t lo = static_cast<int64_t>(g) * s.group - s.first_head, hi = lo + s.group;  // as the kernel: int64
  const int h_begin = static_cast<int>(std::max<int64_t>(0, lo)), h_end = static_cast<int>(std::min<int64_t>(s.H, hi));
  const int q_blocks = s.blocks() - kb, items = std::max(0, h_end - h_begin) * q_blocks;
  for (int warp = 0; warp < kWarps; ++warp) {
    Acc dk(D / 8), dv(D / 8);
    for (Acc* a : {&dk, &dv})
      for (auto& n : *a)
        for (auto& l : n) l.fill(0.0f);
    for (int item = 0; item < items; ++item) {
      const int h = h_begin + item / q_blocks, i0 = (kb + item % q_blocks) * kBlock;
      load_tile(qt, qmat, qs, int64_t(h) * D, i0, T);
      load_tile(dt, dmat, qs, int64_t(h) * D, i0, T);
      float lse_s[kBlock], dot_s[kBlock];
      for (int r = 0; r < kBlock; ++r) {
        const bool in = i0 + r < T;
        lse_s[r] = in ? d.lse[(int64_t(b) * s.H + h) * T + i0 + r] : INFINITY;
        dot_s[r] = in ? d.row_dot[(int64_t(b) * s.H + h) * T + i0 + r] : 0.0f;
      }
      auto query = [&](int l, int n, int e) { return 8 * n + c_col(l, e); };
      Scores p, ds;
      scores(p, &kt, 16 * warp, nullptr, qt);
      scores(ds, &vt, 16 * warp, nullptr, dt);
      probabilities_and_gradients(
          p, ds, scale, [&](int l, int n, int e) { return lse_s[query(l, n, e)] * kLog2e; },
          [&](int l, int n, int e) { return j0 + 16 * warp + c_row(l, e) > i0 + query(l, n, e); },
          [&](int l, int n, int e) { return dot_s[query(l, n, e)]; });
      add_weighted_rows(dv, p, dt);
      add_weighted_rows(dk, ds, qt);
    }
    for (int l = 0; l < 32; ++l)
      for (int half = 0; half < 2; ++half) {
        const int j = j0 + 16 * warp + c_row(l, 2 * half);
        if (j >= T) continue;
        const int64_t at = (int64_t(b) * T + j) * ks + int64_t(g) * D;
        store_row(d.dk, at, dk, l, half, 1.0f);
        store_row(d.dv, at, dv, l, half, 1.0f);
      }
  }
}

void dq_cta(const Shape& s, Data& d, int b, int h, int qb) {
  const int D = s.D, T = s.T, g = s.kv_head(h), i0 = qb * kBlock;
  const int64_t qs = int64_t(s.H) * D, ks = int64_t(s.Hkv) * D;
  const float scale = 1.0f / std::sqrt(float(D));
  const auto kmat = batch_rows(d.k, b, T, ks), vmat = batch_rows(d.v, b, T, ks);
  Tile qt(D), dt(D), kt(D), vt(D);
  load_tile(qt, batch_rows(d.q, b, T, qs), qs, int64_t(h) * D, i0, T);
  load_tile(dt, batch_rows(d.dout, b, T, qs), qs, int64_t(h) * D, i0, T);
  for (int warp = 0; warp < kWarps; ++warp) {
    auto row_i = [&](int l, int e) { return i0 + 16 * warp + c_row(l, e); };
    auto stat = [&](const std::vector<float>& v, int l, int e, float fill) {
      return row_i(l, e) < T ? v[(int64_t(b) * s.H + h) * T + row_i(l, e)] : fill;
    };
    Acc dq(D / 8);
    for (auto& n : dq)
      for (auto& l : n) l.fill(0.0f);
    for (int kb = 0; kb <= qb; ++kb) {
      load_tile(kt, kmat, ks, int64_t(g) * D, kb * kBlock, T);
      load_tile(vt, vmat, ks, int64_t(g) * D, kb * kBlock, T);
      Scores p, ds;
      scores(p, &qt, 16 * warp, nullptr, kt);
      scores(ds, &dt, 16 * warp, nullptr, vt);
      probabilities_and_gradients(
          p, ds, scale,
          [&](int l, int, int e) { return row_i(l, e) < T ? stat(d.lse, l, e, 0.0f) * kLog2e : INFINITY; },
          [&](int l, int n, int e) { return kb == qb && kb * kBlock + 8 * n + c_col(l, e) > row_i(l, e); },
          [&](int l, int, int e) { return stat(d.row_dot, l, e, 0.0f); });
      add_weighted_rows(dq, ds, kt);
    }
    for (int l = 0; l < 32; ++l)
      for (int half = 0; half < 2; ++half) {
        const int i = row_i(l, 2 * half);
        if (i < T) store_row(d.dq, (int64_t(b) * T + i) * qs + int64_t(h) * D, dq, l, half, 1.0f);
      }
  }
}

// float64 causal attention on the bf16 inputs: out, lse, dq, dk, dv.
struct Reference {
  std::vector<double> out, lse, dq, dk, dv;
};

Reference reference(const Shape& s, const Data& d) {
  const int D = s.D, T = s.T;
  const int64_t qs = int64_t(s.H) * D, ks = int64_t(s.Hkv) * D;
  const double scale = 1.0 / std::sqrt(double(D));
  Reference r;
  r.out.assign(d.q.size(), 0.0), r.dq.assign(d.q.size(), 0.0), r.dk.assign(d.k.size(), 0.0), r.dv.assign(d.k.size(), 0.0);
  r.lse.assign(int64_t(s.B) * s.H * T, 0.0);
  auto Q = [&](int b, int i, int h, int c) { return double(value_of(d.q[(int64_t(b) * T + i) * qs + h * D + c])); };
  auto dO = [&](int b, int i, int h, int c) { return double(value_of(d.dout[(int64_t(b) * T + i) * qs + h * D + c])); };
  auto K = [&](int b, int j, int g, int c) { return double(value_of(d.k[(int64_t(b) * T + j) * ks + g * D + c])); };
  auto V = [&](int b, int j, int g, int c) { return double(value_of(d.v[(int64_t(b) * T + j) * ks + g * D + c])); };
  for (int b = 0; b < s.B; ++b)
    for (int h = 0; h < s.H; ++h) {
      const int g = s.kv_head(h);
      for (int i = 0; i < T; ++i) {
        std::vector<double> sc(i + 1), p(i + 1);
        double m = -INFINITY;
        for (int j = 0; j <= i; ++j) {
          double x = 0;
          for (int c = 0; c < D; ++c) x += Q(b, i, h, c) * K(b, j, g, c);
          sc[j] = x * scale;
          m = std::max(m, sc[j]);
        }
        double l = 0;
        for (int j = 0; j <= i; ++j) l += std::exp(sc[j] - m);
        const int64_t o = (int64_t(b) * T + i) * qs + h * D;
        for (int j = 0; j <= i; ++j) {
          p[j] = std::exp(sc[j] - m) / l;
          for (int c = 0; c < D; ++c) r.out[o + c] += p[j] * V(b, j, g, c);
        }
        r.lse[(int64_t(b) * s.H + h) * T + i] = m + std::log(l);
        double Di = 0;
        for (int c = 0; c < D; ++c) Di += dO(b, i, h, c) * r.out[o + c];
        for (int j = 0; j <= i; ++j) {
          double dp = 0;
          for (int c = 0; c < D; ++c) dp += dO(b, i, h, c) * V(b, j, g, c);
          const double dsc = p[j] * (dp - Di) * scale;
          const int64_t kv = (int64_t(b) * T + j) * ks + g * D;
          for (int c = 0; c < D; ++c) {
            r.dq[o + c] += dsc * K(b, j, g, c);
            r.dk[kv + c] += dsc * Q(b, i, h, c);
            r.dv[kv + c] += p[j] * dO(b, i, h, c);
          }
        }
      }
    }
  return r;
}

// max |got - want| / max |want| over a tensor, reported and checked against tol.
void compare(const char* name, const Shape& s, const std::vector<uint16_t>& got, const std::vector<double>& want,
             double tol) {
  double err = 0, top = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = value_of(got[i]);
    err = std::isfinite(g) ? std::max(err, std::fabs(g - want[i])) : INFINITY;
    top = std::max(top, std::fabs(want[i]));
  }
  const double rel = err / (top > 0 ? top : 1);
  std::printf("  %-4s B=%d T=%-3d H=%d Hkv=%d D=%-3d first=%d: rel err %.2e\n", name, s.B, s.T, s.H, s.Hkv, s.D,
              s.first_head, rel);
  check(rel < tol, name);
}

void run_case(const Shape& s, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Data d;
  const int64_t nq = int64_t(s.B) * s.T * s.H * s.D, nk = int64_t(s.B) * s.T * s.Hkv * s.D;
  for (auto* m : {&d.q, &d.k, &d.v, &d.dout}) {
    m->resize(m == &d.k || m == &d.v ? nk : nq);
    for (auto& x : *m) x = bits_of(2.0f * normal(rng));  // scores of a few units: a peaked softmax
  }
  d.out.assign(nq, 0xffff), d.dq.assign(nq, 0xffff), d.dk.assign(nk, 0xffff), d.dv.assign(nk, 0xffff);
  d.lse.assign(int64_t(s.B) * s.H * s.T, NAN), d.row_dot.assign(int64_t(s.B) * s.H * s.T, NAN);
  for (int b = 0; b < s.B; ++b)
    for (int h = 0; h < s.H; ++h)
      for (int qb = 0; qb < s.blocks(); ++qb) forward_cta(s, d, b, h, qb);
  row_dot(s, d);
  for (int b = 0; b < s.B; ++b)
    for (int g = 0; g < s.Hkv; ++g)
      for (int kb = 0; kb < s.blocks(); ++kb) dkdv_cta(s, d, b, g, kb);
  for (int b = 0; b < s.B; ++b)
    for (int h = 0; h < s.H; ++h)
      for (int qb = 0; qb < s.blocks(); ++qb) dq_cta(s, d, b, h, qb);
  const Reference r = reference(s, d);
  double lse_err = 0;
  for (size_t i = 0; i < r.lse.size(); ++i) lse_err = std::max(lse_err, std::fabs(d.lse[i] - r.lse[i]));
  std::printf("  lse  max abs err %.2e\n", lse_err);
  check(lse_err < 1e-3, "lse");
  compare("out", s, d.out, r.out, 2e-2);
  compare("dq", s, d.dq, r.dq, 2e-2);
  compare("dk", s, d.dk, r.dk, 2e-2);
  compare("dv", s, d.dv, r.dv, 2e-2);
}

void check_fragment_maps(std::mt19937& rng) {
  Tile t(64);
  for (auto& x : t.e) x = static_cast<uint16_t>(rng());
  Regs r;
  ldsm(r, t, 16, 32, Addr::A, false);  // A = t[16.., 32..]
  for (int l = 0; l < 32; ++l)
    for (int reg = 0; reg < 4; ++reg)
      for (int e = 0; e < 2; ++e)
        check(uint16_t(r[l][reg] >> (16 * e)) == *t.at(16 + a_row(l, reg), 32 + a_col(l, reg, e)), "a_fragment");
  ldsm(r, t, 16, 32, Addr::B, false);  // B[k][n] = t[16 + n][32 + k], n-tiles 0, 1 in regs {0,1}, {2,3}
  for (int l = 0; l < 32; ++l)
    for (int reg = 0; reg < 4; ++reg)
      for (int e = 0; e < 2; ++e)
        check(uint16_t(r[l][reg] >> (16 * e)) == *t.at(16 + 8 * (reg / 2) + b_n(l), 32 + b_k(l, reg % 2, e)), "b_pair");
  ldsm(r, t, 16, 32, Addr::A, true);  // B[k][n] = t[16 + k][32 + n]
  for (int l = 0; l < 32; ++l)
    for (int reg = 0; reg < 4; ++reg)
      for (int e = 0; e < 2; ++e)
        check(uint16_t(r[l][reg] >> (16 * e)) == *t.at(16 + b_k(l, reg % 2, e), 32 + 8 * (reg / 2) + b_n(l)),
              "b_pair_trans");
  // a_from_c: scores C[row][col] (16 x 16 as two 8-column tiles) -> A fragment of the same block
  float C[16][16];
  for (auto& row : C)
    for (float& x : row) x = std::ldexp(float(rng() % 256), -4);  // exact in bf16
  for (int l = 0; l < 32; ++l) {
    float lo[4], hi[4];
    for (int i = 0; i < 4; ++i) lo[i] = C[c_row(l, i)][c_col(l, i)], hi[i] = C[c_row(l, i)][8 + c_col(l, i)];
    uint32_t a[4];
    a_from_c(lo, hi, a);
    for (int reg = 0; reg < 4; ++reg)
      for (int e = 0; e < 2; ++e)
        check(value_of(uint16_t(a[reg] >> (16 * e))) == C[a_row(l, reg)][a_col(l, reg, e)], "a_from_c");
  }
  check(pack_bf16(1.0f, -2.0f) == ((uint32_t(bits_of(-2.0f)) << 16) | bits_of(1.0f)), "pack_bf16 order");
}

}  // namespace

int main() {
  std::mt19937 rng(12345);
  check_fragment_maps(rng);
  std::printf("fragment maps: %s\n", failures ? "FAIL" : "ok");
  const Shape shapes[] = {
      {1, 1, 1, 1, 64, 1, 0},   {1, 3, 2, 1, 64, 2, 0},   {2, 67, 4, 2, 64, 2, 0},
      {1, 130, 2, 2, 128, 1, 0}, {1, 64, 3, 3, 128, 1, 0}, {1, 129, 2, 2, 64, 2, 1},  // shard: heads 1, 2 of 4
  };
  for (const Shape& s : shapes) run_case(s, rng);
  std::printf("%s\n", failures ? "FAILED" : "all ok");
  return failures ? 1 : 0;
}
