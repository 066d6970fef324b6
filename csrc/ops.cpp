// One dispatch per op: the device of the op's tensors picks the backend's kernel.
#include "palmcore/ops.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cpu/cpu_ops.h"
#include "palmcore/threads.h"
#ifdef PALMCORE_CUDA
#include "cuda/cuda_ops.h"
#define PALMCORE_CUDA_KERNEL(op, ...) return cuda::op(__VA_ARGS__)
#else
#define PALMCORE_CUDA_KERNEL(op, ...) \
  throw std::runtime_error(#op ": palmcore was built without CUDA (PALMCORE_CUDA=OFF, or no nvcc found when it was built)")
#endif

namespace palmcore {

// The one validation layer: every op's tensors are checked here (one device, dtypes, shapes
// that agree), before either backend's kernel runs, so the kernels can trust them.
namespace {

struct Arg {
  const char* name;
  const Tensor& t;
};

[[noreturn]] void refuse(const char* op, const std::string& why) {
  throw std::invalid_argument(std::string(op) + ": " + why);
}

void one_device(const char* op, std::initializer_list<Arg> args) {
  for (const Arg& a : args)
    if (a.t.device() != args.begin()->t.device())
      refuse(op, std::string(a.name) + " is on " + device_name(a.t.device()) + " but " + args.begin()->name +
                     " on " + device_name(args.begin()->t.device()));
}

// `a` is of `dtype` and shaped `shape` (-1: any extent).
void expect(const char* op, const Arg& a, DType dtype, std::vector<int64_t> shape) {
  if (a.t.dtype() != dtype)
    refuse(op, std::string(a.name) + " must be " + dtype_name(dtype) + ", got " + dtype_name(a.t.dtype()));
  bool ok = a.t.ndim() == static_cast<int>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.t.dim(static_cast<int>(i)) == shape[i];
  if (!ok) {
    std::string want = "[";
    for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + (shape[i] < 0 ? "*" : std::to_string(shape[i]));
    refuse(op, std::string(a.name) + " has shape " + a.t.shape_string() + ", expected " + want + "]");
  }
}

// Every tensor of `args` float32 with the first one's shape.
void alike(const char* op, std::initializer_list<Arg> args) {
  one_device(op, args);
  for (const Arg& a : args) expect(op, a, DType::F32, args.begin()->t.shape());
}

// `a` is float32 or bfloat16 (the bf16 mode's storage of an activation), shaped `shape`.
void expect_float(const char* op, const Arg& a, std::vector<int64_t> shape) {
  expect(op, a, a.t.dtype() == DType::BF16 ? DType::BF16 : DType::F32, std::move(shape));
}

// Every tensor of `args` of the first one's dtype (float32 or bfloat16) and shape.
void alike_float(const char* op, std::initializer_list<Arg> args) {
  one_device(op, args);
  expect_float(op, *args.begin(), args.begin()->t.shape());
  for (const Arg& a : args) expect(op, a, args.begin()->t.dtype(), args.begin()->t.shape());
}

// The CPU kernels compute in float32 storage. A CPU op given bf16 tensors runs on float32
// twins: each bf16 tensor widened (exact), the op, then each output twin rounded back into its
// bf16 tensor. A bf16 store is the rounding of the float32 result (PALM_SPEC "Precision"), so
// this gives the bits of the CPU's float32-storage bf16 mode: the oracle of bf16 storage on a
// GPU, whose kernels load and store bf16 themselves.
bool cpu_twins_needed(std::initializer_list<const Tensor*> tensors) {
  bool bf16 = false;
  for (const Tensor* t : tensors) bf16 |= t->dtype() == DType::BF16;
  return bf16 && (*tensors.begin())->device() == Device::CPU;
}
Tensor widened(const Tensor& t) {
  if (t.dtype() != DType::BF16) return t;
  Tensor wide = Tensor::zeros(t.shape(), DType::F32, t.device());
  copy(t, wide);
  return wide;
}
void store_into(const Tensor& wide, Tensor& t) {
  if (wide.raw_data() != t.raw_data()) copy(wide, t);
}

void sums_slot(const char* op, const Tensor& sums, int64_t index, int64_t count) {
  if (sums.dtype() != DType::F64 || index < 0 || index + count > sums.numel())
    refuse(op, "sums must be float64 with room for " + std::to_string(count) + " at index " + std::to_string(index));
}

// q [B·T, H·dh], k, v [B·T, Hkv·dh] for an attention shape.
void attention_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const AttentionShape& s) {
  const int64_t rows = s.batch * s.seq;
  expect_float(op, {"q", q}, {rows, s.heads * s.head_dim});
  expect(op, {"k", k}, q.dtype(), {rows, s.kv_heads * s.head_dim});
  expect(op, {"v", v}, q.dtype(), {rows, s.kv_heads * s.head_dim});
}

}  // namespace

// The CPU case first makes the calling thread's OpenMP regions use palmcore's thread count
// (threads.h): the graph never deals with threads.
#define PALMCORE_DISPATCH(op, device, ...)                               \
  switch (device) {                                                      \
    case Device::CPU:                                                    \
      apply_num_threads();                                               \
      return cpu::op(__VA_ARGS__);                                       \
    case Device::CUDA:                                                   \
      PALMCORE_CUDA_KERNEL(op, __VA_ARGS__);                             \
  }                                                                      \
  throw std::logic_error(#op ": unknown device")

void copy(const Tensor& src, Tensor& dst) {
  if (src.shape() != dst.shape())
    throw std::invalid_argument("copy: source " + src.shape_string() + " and destination " + dst.shape_string() +
                                " differ in shape");
  const bool converts = src.dtype() != dst.dtype();
  const bool f32_bf16 = (src.dtype() == DType::F32 || src.dtype() == DType::BF16) &&
                        (dst.dtype() == DType::F32 || dst.dtype() == DType::BF16);
  if (converts && !f32_bf16)
    throw std::invalid_argument(std::string("copy: no conversion from ") + dtype_name(src.dtype()) + " to " +
                                dtype_name(dst.dtype()));
  // a copy that touches a device runs on that device's backend
  const Device device = src.device() == Device::CPU ? dst.device() : src.device();
  PALMCORE_DISPATCH(copy, device, src, dst);
}

void fill_zero(Tensor& x) { PALMCORE_DISPATCH(fill_zero, x.device(), x); }

void round_bf16(Tensor& x) {
  expect_float("round_bf16", {"x", x}, x.shape());
  if (x.dtype() == DType::BF16) return;  // every bf16 value is its own rounding
  PALMCORE_DISPATCH(round_bf16, x.device(), x);
}

void matmul(const Tensor& a, bool transpose_a, const Tensor& b, bool transpose_b, Tensor& c,
            float alpha, float beta) {
  if (a.device() != c.device() || b.device() != c.device())
    throw std::invalid_argument(std::string("matmul: operands on ") + device_name(a.device()) + ", " +
                                device_name(b.device()) + " and " + device_name(c.device()) + " (one device, please)");
  const bool inputs_ok = a.dtype() == b.dtype() && (a.dtype() == DType::F32 || a.dtype() == DType::BF16);
  const bool output_ok = c.dtype() == DType::F32 || (c.dtype() == DType::BF16 && a.dtype() == DType::BF16);
  if (!inputs_ok || !output_ok)
    throw std::invalid_argument(std::string("matmul: A, B, C of ") + dtype_name(a.dtype()) + ", " +
                                dtype_name(b.dtype()) + ", " + dtype_name(c.dtype()) +
                                "; A and B must both be float32 or both bfloat16, C float32 (or bfloat16 with "
                                "bfloat16 A and B)");
  const int64_t m = transpose_a ? a.dim(1) : a.dim(0), k = transpose_a ? a.dim(0) : a.dim(1);
  const int64_t kb = transpose_b ? b.dim(1) : b.dim(0), n = transpose_b ? b.dim(0) : b.dim(1);
  if (a.ndim() != 2 || b.ndim() != 2 || c.ndim() != 2 || k != kb || c.dim(0) != m || c.dim(1) != n)
    throw std::invalid_argument("matmul: shapes " + a.shape_string() + " x " + b.shape_string() + " -> " +
                                c.shape_string() + " do not agree");
  if (cpu_twins_needed({&c, &a, &b})) {
    Tensor wide_c = widened(c);
    matmul(widened(a), transpose_a, widened(b), transpose_b, wide_c, alpha, beta);
    return store_into(wide_c, c);
  }
  PALMCORE_DISPATCH(matmul, c.device(), a, transpose_a, b, transpose_b, c, alpha, beta);
}

void embedding_forward(const Tensor& table, const Tensor& tokens, Tensor& out, int64_t first) {
  one_device("embedding_forward", {{"table", table}, {"tokens", tokens}, {"out", out}});
  expect_float("embedding_forward", {"table", table}, {-1, -1});
  expect("embedding_forward", {"tokens", tokens}, DType::I32, {-1});
  expect_float("embedding_forward", {"out", out}, {tokens.numel(), table.dim(1)});
  if (cpu_twins_needed({&out, &table})) {
    Tensor wide_out = widened(out);
    embedding_forward(widened(table), tokens, wide_out, first);
    return store_into(wide_out, out);
  }
  PALMCORE_DISPATCH(embedding_forward, out.device(), table, tokens, out, first);
}

void embedding_backward(const Tensor& dout, const Tensor& tokens, Tensor& dtable, int64_t first) {
  one_device("embedding_backward", {{"dout", dout}, {"tokens", tokens}, {"dtable", dtable}});
  expect("embedding_backward", {"dtable", dtable}, DType::F32, {-1, -1});
  expect("embedding_backward", {"tokens", tokens}, DType::I32, {-1});
  expect("embedding_backward", {"dout", dout}, DType::F32, {tokens.numel(), dtable.dim(1)});
  PALMCORE_DISPATCH(embedding_backward, dtable.device(), dout, tokens, dtable, first);
}

void add_to(Tensor& x, const Tensor& y) {
  alike("add_to", {{"x", x}, {"y", y}});
  PALMCORE_DISPATCH(add_to, x.device(), x, y);
}

void layernorm_forward(const Tensor& x, const Tensor& scale, float eps, Tensor& out, Tensor& xhat,
                       Tensor& rstd) {
  alike("layernorm_forward", {{"x", x}, {"xhat", xhat}});
  one_device("layernorm_forward", {{"x", x}, {"out", out}, {"scale", scale}, {"rstd", rstd}});
  expect("layernorm_forward", {"x", x}, DType::F32, {-1, -1});
  expect_float("layernorm_forward", {"out", out}, x.shape());
  if (cpu_twins_needed({&out})) {
    Tensor wide_out = widened(out);
    layernorm_forward(x, scale, eps, wide_out, xhat, rstd);
    return store_into(wide_out, out);
  }
  expect("layernorm_forward", {"scale", scale}, DType::F32, {x.dim(1)});
  expect("layernorm_forward", {"rstd", rstd}, DType::F32, {x.dim(0)});
  PALMCORE_DISPATCH(layernorm_forward, x.device(), x, scale, eps, out, xhat, rstd);
}

void layernorm_backward(const Tensor& dout, const Tensor& xhat, const Tensor& rstd,
                        const Tensor& scale, Tensor& dx, Tensor& dscale) {
  alike("layernorm_backward", {{"dout", dout}, {"xhat", xhat}, {"dx", dx}});
  alike("layernorm_backward", {{"scale", scale}, {"dscale", dscale}});
  one_device("layernorm_backward", {{"dout", dout}, {"rstd", rstd}, {"scale", scale}});
  expect("layernorm_backward", {"dout", dout}, DType::F32, {-1, -1});
  expect("layernorm_backward", {"scale", scale}, DType::F32, {dout.dim(1)});
  expect("layernorm_backward", {"rstd", rstd}, DType::F32, {dout.dim(0)});
  PALMCORE_DISPATCH(layernorm_backward, dx.device(), dout, xhat, rstd, scale, dx, dscale);
}

void rope_apply(Tensor& x, const Tensor& positions, const Tensor& cos_table,
                const Tensor& sin_table, int64_t heads, bool inverse) {
  one_device("rope_apply", {{"x", x}, {"positions", positions}, {"cos_table", cos_table}, {"sin_table", sin_table}});
  expect_float("rope_apply", {"x", x}, {-1, -1});
  if (heads < 1 || x.dim(1) % heads || (x.dim(1) / heads) % 2)
    refuse("rope_apply", "x's width " + std::to_string(x.dim(1)) + " is not " + std::to_string(heads) +
                             " heads of an even width");
  expect("rope_apply", {"positions", positions}, DType::I32, {x.dim(0)});
  expect("rope_apply", {"cos_table", cos_table}, DType::F32, {-1, x.dim(1) / heads / 2});
  expect("rope_apply", {"sin_table", sin_table}, DType::F32, cos_table.shape());
  if (cpu_twins_needed({&x})) {
    Tensor wide = widened(x);
    rope_apply(wide, positions, cos_table, sin_table, heads, inverse);
    return store_into(wide, x);
  }
  PALMCORE_DISPATCH(rope_apply, x.device(), x, positions, cos_table, sin_table, heads, inverse);
}

namespace {
KernelChoice initial_kernel_choice() {
  const char* env = std::getenv("PALMCORE_KERNELS");
  if (!env || std::string(env).empty() || std::string(env) == "fast") return KernelChoice::Fast;
  if (std::string(env) == "plain") return KernelChoice::Plain;
  throw std::invalid_argument(std::string("PALMCORE_KERNELS must be 'fast' or 'plain', got '") + env + "'");
}
std::atomic<KernelChoice>& kernel_choice_setting() {
  static std::atomic<KernelChoice> choice{initial_kernel_choice()};
  return choice;
}
}  // namespace

void set_kernel_choice(KernelChoice choice) { kernel_choice_setting() = choice; }
KernelChoice kernel_choice() { return kernel_choice_setting(); }

bool device_graphs(Device device) {
#ifdef PALMCORE_CUDA
  return device == Device::CUDA;
#else
  (void)device;
  return false;
#endif
}

DeviceGraph capture_graph(Device device, const std::function<void()>& ops) {
  if (!device_graphs(device)) refuse("capture_graph", std::string("no device graphs on ") + device_name(device));
#ifdef PALMCORE_CUDA
  return DeviceGraph{new cuda::CapturedGraph(cuda::capture_graph(ops))};
#else
  (void)ops;
  return DeviceGraph{};
#endif
}

bool launch_graph(const DeviceGraph& graph) {
#ifdef PALMCORE_CUDA
  return graph && cuda::launch_graph(*static_cast<cuda::CapturedGraph*>(graph.handle));
#else
  (void)graph;
  return false;
#endif
}

void destroy_graph(DeviceGraph& graph) {
#ifdef PALMCORE_CUDA
  if (auto* captured = static_cast<cuda::CapturedGraph*>(graph.handle)) {
    cuda::destroy_graph(*captured);
    delete captured;
  }
#endif
  graph.handle = nullptr;
}

AttentionWorkspace AttentionWorkspace::create(const AttentionShape& s, Device device, bool for_backward) {
  AttentionWorkspace ws;
  if (device != Device::CPU) {  // the plain CUDA kernels need no scratch; flash's backward a row each
    if (for_backward) ws.row_dot = Tensor::zeros({s.batch * s.heads * s.seq}, DType::F32, device);
    return ws;
  }
  const int64_t workers = device == Device::CPU ? get_num_threads() : 1;
  const int64_t tile_rows = std::max(kAttentionQueryBlock, s.heads / s.kv_heads);
  ws.tiles = Tensor::zeros({workers, 2, tile_rows, s.seq}, DType::F32, device);
  if (for_backward) {
    ws.dkeys_part = Tensor::zeros({s.batch * s.heads, s.seq, s.head_dim}, DType::F32, device);
    ws.dvalues_part = Tensor::zeros({s.batch * s.heads, s.seq, s.head_dim}, DType::F32, device);
  }
  return ws;
}

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse,
                       const AttentionShape& shape, AttentionWorkspace& ws) {
  one_device("attention_forward", {{"q", q}, {"k", k}, {"v", v}, {"out", out}, {"lse", lse}});
  attention_inputs("attention_forward", q, k, v, shape);
  expect("attention_forward", {"out", out}, q.dtype(), q.shape());
  expect("attention_forward", {"lse", lse}, DType::F32, {shape.batch * shape.heads * shape.seq});
  if (cpu_twins_needed({&q})) {
    Tensor wide_out = widened(out);
    attention_forward(widened(q), widened(k), widened(v), wide_out, lse, shape, ws);
    return store_into(wide_out, out);
  }
  PALMCORE_DISPATCH(attention_forward, q.device(), q, k, v, out, lse, shape, ws);
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv,
                        const AttentionShape& shape, AttentionWorkspace& ws) {
  one_device("attention_backward", {{"q", q}, {"k", k}, {"v", v}, {"out", out}, {"lse", lse}, {"dout", dout},
                                    {"dq", dq}, {"dk", dk}, {"dv", dv}});
  attention_inputs("attention_backward", q, k, v, shape);
  alike_float("attention_backward", {{"q", q}, {"out", out}, {"dout", dout}, {"dq", dq}});
  alike_float("attention_backward", {{"k", k}, {"dk", dk}, {"dv", dv}});
  expect("attention_backward", {"lse", lse}, DType::F32, {shape.batch * shape.heads * shape.seq});
  if (cpu_twins_needed({&q})) {
    Tensor wide_dq = widened(dq), wide_dk = widened(dk), wide_dv = widened(dv);
    attention_backward(widened(q), widened(k), widened(v), widened(out), lse, widened(dout), wide_dq, wide_dk,
                       wide_dv, shape, ws);
    store_into(wide_dq, dq);
    store_into(wide_dk, dk);
    return store_into(wide_dv, dv);
  }
  PALMCORE_DISPATCH(attention_backward, q.device(), q, k, v, out, lse, dout, dq, dk, dv, shape, ws);
}

void attention_cached(const Tensor& q, const Tensor& slots, const Tensor& positions, const Tensor& k_cache,
                      const Tensor& v_cache, Tensor& out, const AttentionShape& shape, AttentionWorkspace& ws) {
  one_device("attention_cached", {{"q", q}, {"slots", slots}, {"positions", positions}, {"k_cache", k_cache},
                                  {"v_cache", v_cache}, {"out", out}});
  expect_float("attention_cached", {"q", q}, {-1, shape.heads * shape.head_dim});
  expect("attention_cached", {"out", out}, q.dtype(), q.shape());
  expect("attention_cached", {"slots", slots}, DType::I32, {q.dim(0)});
  expect("attention_cached", {"positions", positions}, DType::I32, {q.dim(0)});
  expect("attention_cached", {"k_cache", k_cache}, q.dtype(), {shape.batch * shape.seq, shape.kv_heads * shape.head_dim});
  expect("attention_cached", {"v_cache", v_cache}, q.dtype(), k_cache.shape());
  if (cpu_twins_needed({&q})) {
    Tensor wide_out = widened(out);
    attention_cached(widened(q), slots, positions, widened(k_cache), widened(v_cache), wide_out, shape, ws);
    return store_into(wide_out, out);
  }
  PALMCORE_DISPATCH(attention_cached, q.device(), q, slots, positions, k_cache, v_cache, out, shape, ws);
}

void kv_cache_write(const Tensor& k, const Tensor& v, const Tensor& slots, const Tensor& positions,
                    Tensor& k_cache, Tensor& v_cache, int64_t capacity) {
  one_device("kv_cache_write", {{"k", k}, {"v", v}, {"slots", slots}, {"positions", positions}, {"k_cache", k_cache},
                                {"v_cache", v_cache}});
  alike_float("kv_cache_write", {{"k", k}, {"v", v}});
  alike_float("kv_cache_write", {{"k_cache", k_cache}, {"v_cache", v_cache}});
  expect("kv_cache_write", {"k", k}, k_cache.dtype(), {-1, k_cache.dim(1)});
  expect("kv_cache_write", {"slots", slots}, DType::I32, {k.dim(0)});
  expect("kv_cache_write", {"positions", positions}, DType::I32, {k.dim(0)});
  if (capacity < 1 || k_cache.dim(0) % capacity) refuse("kv_cache_write", "the cache's rows are not slots x capacity");
  if (cpu_twins_needed({&k_cache})) {
    Tensor wide_k_cache = widened(k_cache), wide_v_cache = widened(v_cache);
    kv_cache_write(widened(k), widened(v), slots, positions, wide_k_cache, wide_v_cache, capacity);
    store_into(wide_k_cache, k_cache);
    return store_into(wide_v_cache, v_cache);
  }
  PALMCORE_DISPATCH(kv_cache_write, k_cache.device(), k, v, slots, positions, k_cache, v_cache, capacity);
}

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) {
  alike_float("swiglu_forward", {{"gate", gate}, {"up", up}, {"out", out}});
  if (cpu_twins_needed({&out})) {
    Tensor wide_out = widened(out);
    swiglu_forward(widened(gate), widened(up), wide_out);
    return store_into(wide_out, out);
  }
  PALMCORE_DISPATCH(swiglu_forward, out.device(), gate, up, out);
}

void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate,
                     Tensor& dup) {
  alike_float("swiglu_backward", {{"gate", gate}, {"up", up}, {"dout", dout}, {"dgate", dgate}, {"dup", dup}});
  if (cpu_twins_needed({&dgate})) {
    Tensor wide_dgate = widened(dgate), wide_dup = widened(dup);
    swiglu_backward(widened(gate), widened(up), widened(dout), wide_dgate, wide_dup);
    store_into(wide_dgate, dgate);
    return store_into(wide_dup, dup);
  }
  PALMCORE_DISPATCH(swiglu_backward, dgate.device(), gate, up, dout, dgate, dup);
}

void moe_route(const Tensor& logits, int64_t k, Tensor& probs, Tensor& lse, Tensor& experts, Tensor& weights,
               Tensor& stats) {
  one_device("moe_route", {{"logits", logits}, {"probs", probs}, {"lse", lse}, {"experts", experts},
                           {"weights", weights}, {"stats", stats}});
  expect("moe_route", {"logits", logits}, DType::F32, {-1, -1});
  const int64_t N = logits.dim(0), E = logits.dim(1);
  if (k < 1 || k > E) refuse("moe_route", "k = " + std::to_string(k) + " is not in [1, E = " + std::to_string(E) + "]");
  expect("moe_route", {"probs", probs}, DType::F32, {N, E});
  expect("moe_route", {"lse", lse}, DType::F32, {N});
  expect("moe_route", {"experts", experts}, DType::I32, {N, k});
  expect("moe_route", {"weights", weights}, DType::F32, {N, k});
  expect("moe_route", {"stats", stats}, DType::F64, {2 * E + 1});
  PALMCORE_DISPATCH(moe_route, logits.device(), logits, k, probs, lse, experts, weights, stats);
}

void moe_dispatch(const Tensor& experts, int64_t first, int64_t count, Tensor& order, Tensor& slot_of,
                  Tensor& offsets) {
  one_device("moe_dispatch", {{"experts", experts}, {"order", order}, {"slot_of", slot_of}, {"offsets", offsets}});
  expect("moe_dispatch", {"experts", experts}, DType::I32, {-1, -1});
  if (first < 0 || count < 1) refuse("moe_dispatch", "the local experts must be a non-empty range from >= 0");
  expect("moe_dispatch", {"order", order}, DType::I32, {experts.numel()});
  expect("moe_dispatch", {"slot_of", slot_of}, DType::I32, experts.shape());
  expect("moe_dispatch", {"offsets", offsets}, DType::I32, {count + 1});
  PALMCORE_DISPATCH(moe_dispatch, experts.device(), experts, first, count, order, slot_of, offsets);
}

void moe_combine(const Tensor& y, const Tensor& slot_of, const Tensor* weights, Tensor& out) {
  one_device("moe_combine", {{"y", y}, {"slot_of", slot_of}, {"out", out}});
  expect("moe_combine", {"out", out}, DType::F32, {-1, -1});
  expect("moe_combine", {"slot_of", slot_of}, DType::I32, {out.dim(0), -1});
  expect("moe_combine", {"y", y}, DType::F32, {slot_of.numel(), out.dim(1)});
  if (weights) {
    one_device("moe_combine", {{"out", out}, {"weights", *weights}});
    expect("moe_combine", {"weights", *weights}, DType::F32, slot_of.shape());
  }
  PALMCORE_DISPATCH(moe_combine, out.device(), y, slot_of, weights, out);
}

void moe_combine_backward(const Tensor& dout, const Tensor& y, const Tensor& slot_of, const Tensor& weights,
                          Tensor& dy, Tensor& dweights) {
  one_device("moe_combine_backward", {{"dout", dout}, {"y", y}, {"slot_of", slot_of}, {"weights", weights},
                                      {"dy", dy}, {"dweights", dweights}});
  expect_float("moe_combine_backward", {"dout", dout}, {-1, -1});
  expect("moe_combine_backward", {"slot_of", slot_of}, DType::I32, {dout.dim(0), -1});
  expect("moe_combine_backward", {"y", y}, DType::F32, {slot_of.numel(), dout.dim(1)});
  expect("moe_combine_backward", {"weights", weights}, DType::F32, slot_of.shape());
  expect("moe_combine_backward", {"dy", dy}, dout.dtype(), y.shape());
  expect("moe_combine_backward", {"dweights", dweights}, DType::F32, slot_of.shape());
  if (cpu_twins_needed({&dout})) {
    Tensor wide_dy = widened(dy);
    moe_combine_backward(widened(dout), y, slot_of, weights, wide_dy, dweights);
    return store_into(wide_dy, dy);
  }
  PALMCORE_DISPATCH(moe_combine_backward, dout.device(), dout, y, slot_of, weights, dy, dweights);
}

void moe_weights_backward(const Tensor& probs, const Tensor& experts, const Tensor& weights, const Tensor& dweights,
                          Tensor& dprobs) {
  one_device("moe_weights_backward", {{"probs", probs}, {"experts", experts}, {"weights", weights},
                                      {"dweights", dweights}, {"dprobs", dprobs}});
  alike("moe_weights_backward", {{"probs", probs}, {"dprobs", dprobs}});
  expect("moe_weights_backward", {"probs", probs}, DType::F32, {-1, -1});
  expect("moe_weights_backward", {"experts", experts}, DType::I32, {probs.dim(0), -1});
  alike("moe_weights_backward", {{"weights", weights}, {"dweights", dweights}});
  expect("moe_weights_backward", {"weights", weights}, DType::F32, experts.shape());
  PALMCORE_DISPATCH(moe_weights_backward, probs.device(), probs, experts, weights, dweights, dprobs);
}

void moe_logits_backward(const Tensor& probs, const Tensor& lse, const Tensor& dprobs, const Tensor& stats, int64_t k,
                         double balance, double z, Tensor& dlogits) {
  one_device("moe_logits_backward", {{"probs", probs}, {"lse", lse}, {"dprobs", dprobs}, {"stats", stats},
                                     {"dlogits", dlogits}});
  alike("moe_logits_backward", {{"probs", probs}, {"dprobs", dprobs}, {"dlogits", dlogits}});
  expect("moe_logits_backward", {"probs", probs}, DType::F32, {-1, -1});
  expect("moe_logits_backward", {"lse", lse}, DType::F32, {probs.dim(0)});
  expect("moe_logits_backward", {"stats", stats}, DType::F64, {2 * probs.dim(1) + 1});
  if (k < 1 || k > probs.dim(1)) refuse("moe_logits_backward", "k is not in [1, E]");
  PALMCORE_DISPATCH(moe_logits_backward, probs.device(), probs, lse, dprobs, stats, k, balance, z, dlogits);
}

void cross_entropy_stats(const Tensor& logits, const Tensor& targets, int64_t first, Tensor& lse,
                         Tensor& picked) {
  one_device("cross_entropy_stats", {{"logits", logits}, {"targets", targets}, {"lse", lse}, {"picked", picked}});
  expect("cross_entropy_stats", {"logits", logits}, DType::F32, {-1, -1});
  expect("cross_entropy_stats", {"targets", targets}, DType::I32, {logits.dim(0)});
  expect("cross_entropy_stats", {"lse", lse}, DType::F32, {logits.dim(0)});
  expect("cross_entropy_stats", {"picked", picked}, DType::F32, {logits.dim(0)});
  PALMCORE_DISPATCH(cross_entropy_stats, logits.device(), logits, targets, first, lse, picked);
}

void cross_entropy_backward(Tensor& logits, const Tensor& targets, int64_t first, const Tensor& lse,
                            float z_loss, float grad_scale) {
  one_device("cross_entropy_backward", {{"logits", logits}, {"targets", targets}, {"lse", lse}});
  expect("cross_entropy_backward", {"logits", logits}, DType::F32, {-1, -1});
  expect("cross_entropy_backward", {"targets", targets}, DType::I32, {logits.dim(0)});
  expect("cross_entropy_backward", {"lse", lse}, DType::F32, {logits.dim(0)});
  PALMCORE_DISPATCH(cross_entropy_backward, logits.device(), logits, targets, first, lse, z_loss, grad_scale);
}

void lse_combine(Tensor& lse, const Tensor& top, bool back) {
  alike("lse_combine", {{"lse", lse}, {"top", top}});
  PALMCORE_DISPATCH(lse_combine, lse.device(), lse, top, back);
}

void cross_entropy_sums(const Tensor& lse, const Tensor& picked, const Tensor& targets, double z_loss,
                        Tensor& sums) {
  one_device("cross_entropy_sums", {{"lse", lse}, {"picked", picked}, {"targets", targets}, {"sums", sums}});
  alike("cross_entropy_sums", {{"lse", lse}, {"picked", picked}});
  expect("cross_entropy_sums", {"targets", targets}, DType::I32, lse.shape());
  sums_slot("cross_entropy_sums", sums, 0, 2);
  PALMCORE_DISPATCH(cross_entropy_sums, sums.device(), lse, picked, targets, z_loss, sums);
}

void sample_tokens(const Tensor& logits, const Tensor& rows, const Tensor& steps, const Tensor& seen,
                   const Tensor& seen_offsets, const SamplingSettings& settings, Tensor& tokens) {
  one_device("sample_tokens", {{"logits", logits}, {"rows", rows}, {"steps", steps}, {"seen", seen},
                               {"seen_offsets", seen_offsets}, {"tokens", tokens}});
  expect("sample_tokens", {"logits", logits}, DType::F32, {-1, -1});
  const int64_t n = logits.dim(0);
  expect("sample_tokens", {"rows", rows}, DType::I32, {n});
  expect("sample_tokens", {"steps", steps}, DType::I32, {n});
  expect("sample_tokens", {"seen", seen}, DType::I32, {-1});
  expect("sample_tokens", {"seen_offsets", seen_offsets}, DType::I32, {n + 1});
  expect("sample_tokens", {"tokens", tokens}, DType::I32, {n});
  if (logits.dim(1) < 1 || logits.dim(1) > INT32_MAX) refuse("sample_tokens", "the vocabulary must be 1 to 2^31 - 1 wide");
  settings.validate();
  PALMCORE_DISPATCH(sample_tokens, logits.device(), logits, rows, steps, seen, seen_offsets, settings, tokens);
}

void sum_squares(const Tensor& x, Tensor& sums, int64_t index) {
  one_device("sum_squares", {{"x", x}, {"sums", sums}});
  expect("sum_squares", {"x", x}, DType::F32, x.shape());
  sums_slot("sum_squares", sums, index, 1);
  PALMCORE_DISPATCH(sum_squares, x.device(), x, sums, index);
}

void adafactor_second_moment(const Tensor& x, const Tensor& g, Tensor& v, int64_t step, double grad_scale,
                             const AdafactorSettings& settings, Tensor& sums, int64_t index) {
  alike("adafactor_second_moment", {{"x", x}, {"g", g}, {"v", v}});
  one_device("adafactor_second_moment", {{"x", x}, {"sums", sums}});
  sums_slot("adafactor_second_moment", sums, index, 2);
  PALMCORE_DISPATCH(adafactor_second_moment, x.device(), x, g, v, step, grad_scale, settings, sums, index);
}

void adafactor_apply(Tensor& x, const Tensor& g, Tensor& m, const Tensor& v, double lr, double grad_scale,
                     double rms_u, double rms_x, const AdafactorSettings& settings, Tensor* rounded) {
  alike("adafactor_apply", {{"x", x}, {"g", g}, {"m", m}, {"v", v}});
  if (rounded) {
    one_device("adafactor_apply", {{"x", x}, {"rounded", *rounded}});
    expect_float("adafactor_apply", {"rounded", *rounded}, x.shape());
  }
  PALMCORE_DISPATCH(adafactor_apply, x.device(), x, g, m, v, lr, grad_scale, rms_u, rms_x, settings, rounded);
}

void adamw_update(Tensor& x, const Tensor& g, Tensor& m, Tensor& v, int64_t step, double lr,
                  double grad_scale, const AdamWSettings& settings, Tensor* rounded) {
  alike("adamw_update", {{"x", x}, {"g", g}, {"m", m}, {"v", v}});
  if (rounded) {
    one_device("adamw_update", {{"x", x}, {"rounded", *rounded}});
    expect_float("adamw_update", {"rounded", *rounded}, x.shape());
  }
  PALMCORE_DISPATCH(adamw_update, x.device(), x, g, m, v, step, lr, grad_scale, settings, rounded);
}

}  // namespace palmcore
