// Per-op CPU timings of one training step's shapes, so a slow kernel shows up by name.
//
//   cmake -S . -B build/bench -DPALMCORE_BUILD_BENCH=ON && cmake --build build/bench -j
//   build/bench/bench_ops [B T D H Hkv dh F V threads]      (default: the seed preset, B=8, T=256)
//
// Each line: the op, its median time over the repeats, and GFLOP/s where the op has a FLOP count.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "palmcore/model.h"
#include "palmcore/ops.h"
#include "palmcore/random.h"
#include "palmcore/threads.h"

using namespace palmcore;

namespace {

Tensor random_tensor(std::vector<int64_t> shape, uint64_t stream) {
  Tensor t = Tensor::zeros(std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = static_cast<float>(standard_normal(1, stream, i));
  return t;
}

Tensor random_ids(int64_t rows, int64_t vocab, uint64_t stream) {
  Tensor t = Tensor::zeros({rows}, DType::I32);
  for (int64_t i = 0; i < rows; ++i) t.data<int32_t>()[i] = static_cast<int32_t>(uniform01(1, stream, i) * vocab);
  return t;
}

void report(const char* name, double flops, const std::function<void()>& op, int repeats = 5) {
  op();  // warm-up
  std::vector<double> times;
  for (int r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    op();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  const double t = times[times.size() / 2];
  if (flops > 0)
    std::printf("%-28s %10.3f ms %9.1f GFLOP/s\n", name, t * 1e3, flops / t * 1e-9);
  else
    std::printf("%-28s %10.3f ms\n", name, t * 1e3);
}

}  // namespace

int main(int argc, char** argv) {
  int64_t a[9] = {8, 256, 256, 8, 1, 32, 1024, 10000, 0};
  for (int i = 1; i < argc && i <= 9; ++i) a[i - 1] = std::atoll(argv[i]);
  const int64_t B = a[0], T = a[1], D = a[2], H = a[3], Hkv = a[4], dh = a[5], F = a[6], V = a[7];
  if (a[8] > 0) set_num_threads(static_cast<int>(a[8]));
  const int64_t rows = B * T;
  std::printf("B=%ld T=%ld D=%ld H=%ld Hkv=%ld dh=%ld F=%ld V=%ld threads=%d\n", B, T, D, H, Hkv, dh,
              F, V, get_num_threads());

  Tensor x = random_tensor({rows, D}, 0), h = random_tensor({rows, D}, 1), w = random_tensor({D, F}, 2);
  Tensor y = Tensor::zeros({rows, F}), xhat = Tensor::zeros({rows, D}), rstd = Tensor::zeros({rows});
  Tensor scale = random_tensor({D}, 3), dscale = Tensor::zeros({D}), dx = Tensor::zeros({rows, D});
  report("matmul h@W [rows,D]x[D,F]", 2.0 * rows * D * F, [&] { matmul(h, false, w, false, y); });
  report("matmul dW += hT@dy", 2.0 * rows * D * F, [&] { matmul(h, true, y, false, w, 1.0f, 1.0f); });
  report("layernorm_forward", 0, [&] { layernorm_forward(x, scale, 1e-5f, h, xhat, rstd); });
  report("layernorm_backward", 0, [&] { layernorm_backward(h, xhat, rstd, scale, dx, dscale); });

  Tensor gate = random_tensor({rows, F}, 4), up = random_tensor({rows, F}, 5);
  Tensor dgate = Tensor::zeros({rows, F}), dup = Tensor::zeros({rows, F});
  report("swiglu_forward", 0, [&] { swiglu_forward(gate, up, y); });
  report("swiglu_backward", 0, [&] { swiglu_backward(gate, up, y, dgate, dup); });

  const AttentionShape shape{B, T, H, Hkv, dh};
  AttentionWorkspace ws = AttentionWorkspace::create(shape, Device::CPU, true);
  Tensor q = random_tensor({rows, H * dh}, 6), k = random_tensor({rows, Hkv * dh}, 7);
  Tensor v = random_tensor({rows, Hkv * dh}, 8), o = Tensor::zeros({rows, H * dh});
  Tensor lse = Tensor::zeros({B * H * T}), dq = Tensor::zeros({rows, H * dh});
  Tensor dk = Tensor::zeros({rows, Hkv * dh}), dv = Tensor::zeros({rows, Hkv * dh});
  const double attention_flops = 4.0 * B * H * dh * T * (T + 1) / 2;  // two products, causal half
  report("attention_forward", attention_flops, [&] { attention_forward(q, k, v, o, lse, shape, ws); });
  report("attention_backward", 2.5 * attention_flops,
         [&] { attention_backward(q, k, v, o, lse, o, dq, dk, dv, shape, ws); });

  const int64_t chunk = std::min<int64_t>(rows, std::max<int64_t>(64, (int64_t{16} << 20) / V));
  Tensor logits = Tensor::zeros({chunk, V}), targets = random_ids(chunk, V, 9);
  Tensor row_picked = Tensor::zeros({chunk}), row_lse = Tensor::zeros({chunk});
  Tensor embed = random_tensor({V, D}, 10);
  report("logits chunk h@E^T", 2.0 * chunk * D * V,
         [&] { matmul(h.rows(0, chunk), false, embed, true, logits, 0.0625f); });
  report("cross_entropy chunk", 0, [&] {
    matmul(h.rows(0, chunk), false, embed, true, logits, 0.0625f);
    cross_entropy_stats(logits, targets, 0, row_lse, row_picked);
    cross_entropy_backward(logits, targets, 0, row_lse, 1e-4f, 1.0f / chunk);
  });

  ModelConfig config{V, D, 6, H, Hkv, dh, F, std::max<int64_t>(T, 2048), 10000.0, 1e-5, 1e-4};
  Model model(config, 0);
  Tensor tokens = random_ids(rows, V, 11).reshape({B, T}), next = random_ids(rows, V, 12).reshape({B, T});
  report("model step (L=6)", 0, [&] { model.forward_backward(tokens, next); }, 3);
  return 0;
}
