// Running a grid on the emulated device: blocks one after another on the calling OS thread, the
// threads of a block as fibers (small stacks from one mmap'ed arena, switched by
// fiber_switch.h) switched only where they wait for each other.
//
// A block runs in phases. In a phase every runnable thread runs, one after another in the
// phase's order (PALMCORE_EMULATE_ORDER: forward, reverse, or shuffle[:seed], a fresh seeded
// permutation per phase), until it exits or waits: at a block barrier or at a warp collective.
// Then the waits that can be met are met:
//   - a warp collective, when every lane of its mask waits at one with the same mask and
//     operation (each lane gets its result and runs again);
//   - else the block barrier, when every live thread waits at the same one (same file, line and
//     form). A barrier reached by only some of the live threads (others exited, or wait at
//     another barrier or at a warp collective) is an error naming the kernel, never a hang.
// A kernel whose result depends on the order of a phase has a race that a GPU may show.
//
// Errors (an exception thrown by the kernel's code in a fiber, a broken barrier or collective)
// are carried out of the fiber as an exception_ptr (no exception crosses a context switch) and
// rethrown by run_grid as std::runtime_error naming the kernel, block and thread.
#include "executor.h"
#include "fiber_switch.h"
#include "palmcore_emu/tensor_core.h"

#include <sys/mman.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace palmcore_emu {
namespace {

#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kStackBytes = size_t{512} << 10;  // ASan's redzones make frames larger
#else
constexpr size_t kStackBytes = size_t{64} << 10;
#endif
constexpr size_t kGuardBytes = 4096;  // an unmapped page under each stack: an overflow faults
constexpr int kMaxThreads = 1024;
constexpr size_t kStaticSharedBytes = 48 << 10;

enum class State { Runnable, AtBarrier, AtWarp, Exited };

struct Fiber {
  void* sp = nullptr;  // its saved stack pointer while it is not running
  char* stack = nullptr;
  uint3 thread;
  int linear = 0;
  State state = State::Runnable;
  // the wait: a barrier's kind, predicate and site, or a collective's operation and values
  BarrierKind barrier = BarrierKind::Sync;
  WarpOp op = WarpOp::Sync;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int lane_arg = 0, width = kWarpSize;
  const char* file = "";
  int line = 0;
  // a warp_exchange's data and what it is
  const void* in = nullptr;
  void* out = nullptr;
  WarpCombine combine = nullptr;
  const char* what = "";
  // cp.async copies not yet done: group -1 until committed
  struct Copy {
    void* dst;
    const void* src;
    size_t bytes;
    int group;
  };
  std::vector<Copy> copies;
  int committed = 0;
  // Does the copies of the groups before `group` (all committed ones for INT_MAX, and the
  // uncommitted too when `uncommitted`).
  void finish_copies(int group, bool uncommitted) {
    size_t kept = 0;
    for (const Copy& c : copies) {
      if ((c.group >= 0 && c.group < group) || (c.group < 0 && uncommitted))
        std::memcpy(c.dst, c.src, c.bytes);
      else
        copies[kept++] = c;
    }
    copies.resize(kept);
  }
};

std::string describe(const uint3& t) {
  return "(" + std::to_string(t.x) + ", " + std::to_string(t.y) + ", " + std::to_string(t.z) + ")";
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::Shfl: return "__shfl_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::Any: return "__any_sync";
    case WarpOp::All: return "__all_sync";
    case WarpOp::Exchange: return "a warp-wide instruction";
  }
  return "?";
}

const char* barrier_name(BarrierKind kind) {
  switch (kind) {
    case BarrierKind::Sync: return "__syncthreads";
    case BarrierKind::Or: return "__syncthreads_or";
    case BarrierKind::And: return "__syncthreads_and";
    case BarrierKind::Count: return "__syncthreads_count";
  }
  return "?";
}

std::string site(const char* file, int line) {
  std::string f = file;
  const size_t slash = f.rfind('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(line);
}

// The order of the threads within a phase (PALMCORE_EMULATE_ORDER, read at each launch).
struct Order {
  enum Kind { Forward, Reverse, Shuffle } kind = Forward;
  uint64_t seed = 0;
};

Order order_setting() {
  Order order;
  const char* env = std::getenv("PALMCORE_EMULATE_ORDER");
  if (!env || !*env || std::strcmp(env, "forward") == 0) return order;
  const std::string value = env;
  if (value == "reverse") {
    order.kind = Order::Reverse;
  } else if (value.rfind("shuffle", 0) == 0 && (value.size() == 7 || value[7] == ':')) {
    order.kind = Order::Shuffle;
    if (value.size() > 8) order.seed = std::strtoull(value.c_str() + 8, nullptr, 10);
  } else {
    throw std::invalid_argument("PALMCORE_EMULATE_ORDER=" + value + ": use forward, reverse or shuffle[:seed]");
  }
  return order;
}

// One block's threads, shared memory and scheduler; one per OS thread, reused block after block.
struct Block {
  const LaunchConfig* config = nullptr;
  uint3 index{};
  std::vector<Fiber> fibers;
  int count = 0;    // threads of this block
  int current = -1;  // the running fiber
  void* scheduler = nullptr;  // the scheduler's saved stack pointer while a fiber runs
  FiberStacks asan;           // (AddressSanitizer's view of the switches)
  std::exception_ptr error;
  // stacks: kMaxThreads of kStackBytes, each above a guard page
  char* arena = nullptr;
  // shared memory: this block's static variables (id, bytes), each its own allocation, and the
  // dynamic part (exactly the launch's size), so that AddressSanitizer sees every overrun
  std::vector<std::pair<int, std::unique_ptr<unsigned char[]>>> static_shared;
  size_t static_used = 0;
  std::unique_ptr<unsigned char[]> dynamic_shared;
  size_t dynamic_bytes = 0;
  Order order;
  std::mt19937_64 random;
  std::vector<int> sequence;

  Block() : fibers(kMaxThreads) {
    const size_t slot = kStackBytes + kGuardBytes, total = slot * kMaxThreads;
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("emulated device: no memory for the threads' stacks");
    arena = static_cast<char*>(p);
    for (int i = 0; i < kMaxThreads; ++i) {
      mprotect(arena + i * slot, kGuardBytes, PROT_NONE);
      fibers[i].stack = arena + i * slot + kGuardBytes;
    }
  }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;

  Fiber& running() { return fibers[current]; }
  [[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error("block " + describe(index) + ": " + what);
  }

  void run(const LaunchConfig& cfg, const uint3& block_index, const std::function<void()>& body);
  void schedule();
  bool meet_warp_waits();
  bool meet_barrier();
  [[noreturn]] void stuck();
  void compute_collective(Fiber& f, const std::vector<int>& lanes, int warp_base);
};

thread_local Block* running_block = nullptr;
thread_local const std::function<void()>* running_body = nullptr;

void fiber_main() {
  Block& b = *running_block;
  try {
    (*running_body)();
  } catch (...) {
    if (!b.error) b.error = std::current_exception();
  }
  Fiber& f = b.running();
  f.finish_copies(INT_MAX, true);  // a GPU completes a thread's copies after it exits too
  f.state = State::Exited;
}

// Where a fiber starts (fiber_switch.h's first switch to it returns here): runs the kernel body,
// then goes back to the scheduler for good.
[[noreturn]] void fiber_start() {
  Block& b = *running_block;
  b.asan.entered(nullptr);
  fiber_main();
  b.asan.leave(nullptr);
  void* unused = nullptr;
  fiber_switch(&unused, b.scheduler);
  __builtin_unreachable();
}

void Block::run(const LaunchConfig& cfg, const uint3& block_index, const std::function<void()>& body) {
  config = &cfg;
  index = block_index;
  count = static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z);
  error = nullptr;
  static_shared.clear();
  static_used = 0;
  if (!dynamic_shared || dynamic_bytes != cfg.shared_bytes) {
    dynamic_shared.reset(new unsigned char[std::max<size_t>(cfg.shared_bytes, 1)]);
    dynamic_bytes = cfg.shared_bytes;
  }
  std::memset(dynamic_shared.get(), 0xFF, cfg.shared_bytes);
  for (int i = 0; i < count; ++i) {
    Fiber& f = fibers[i];
    f.linear = i;
    f.thread = {i % cfg.block.x, (i / cfg.block.x) % cfg.block.y, i / (cfg.block.x * cfg.block.y)};
    f.state = State::Runnable;
    f.copies.clear();
    f.committed = 0;
    asan.reuse(f.stack, kStackBytes);
    f.sp = fiber_stack_start(f.stack, kStackBytes, fiber_start);
  }
  running_block = this;
  running_body = &body;
  try {
    schedule();
  } catch (...) {
    running_block = nullptr;
    throw;
  }
  running_block = nullptr;
}

void Block::schedule() {
  sequence.resize(count);
  for (uint64_t phase = 0;; ++phase) {
    std::iota(sequence.begin(), sequence.end(), 0);
    if (order.kind == Order::Reverse) {
      std::reverse(sequence.begin(), sequence.end());
    } else if (order.kind == Order::Shuffle) {
      random.seed(order.seed * 0x9E3779B97F4A7C15ull + ((uint64_t(index.z) << 42) ^ (uint64_t(index.y) << 21) ^ index.x) +
                  phase * 0xD1B54A32D192ED03ull);
      std::shuffle(sequence.begin(), sequence.end(), random);
    }
    for (int i : sequence) {
      if (fibers[i].state != State::Runnable) continue;
      current = i;
      asan.enter(fibers[i].stack, kStackBytes);
      fiber_switch(&scheduler, fibers[i].sp);
      asan.back();
      current = -1;
      if (error) {
        const uint3 t = fibers[i].thread;
        try {
          std::rethrow_exception(error);
        } catch (const std::exception& e) {
          fail("thread " + describe(t) + ": " + e.what());
        } catch (...) {
          fail("thread " + describe(t) + ": an exception that is not a std::exception");
        }
      }
    }
    bool live = false;
    for (int i = 0; i < count; ++i) live |= fibers[i].state != State::Exited;
    if (!live) return;
    if (meet_warp_waits() || meet_barrier()) continue;
    stuck();
  }
}

// A collective's result for lane `f` of the warp starting at thread `base` (the lanes of its
// mask all wait, with their values in place). Shuffles follow the CUDA rule for `width`: the
// warp is cut into segments of `width` lanes; __shfl_sync reads lane (src mod width) of the own
// segment, up/down read lane ∓ delta and keep their own value past the segment's start or end,
// xor reads lane ^ mask and keeps its own value past the segment's end.
void Block::compute_collective(Fiber& f, const std::vector<int>& lanes, int base) {
  const int lane = f.linear - base;
  auto value_of = [&](int source) -> uint64_t {
    if (source == lane) return f.value;
    if (!(f.mask >> source & 1u))
      fail("thread " + describe(f.thread) + " at " + site(f.file, f.line) + ": " + op_name(f.op) + " reads lane " +
           std::to_string(source) + ", which its mask 0x" + [&] {
             char buf[16];
             std::snprintf(buf, sizeof buf, "%08x", f.mask);
             return std::string(buf);
           }() + " leaves out");
    return fibers[base + source].value;
  };
  const int width = f.width;
  if ((f.op == WarpOp::Shfl || f.op == WarpOp::ShflUp || f.op == WarpOp::ShflDown || f.op == WarpOp::ShflXor) &&
      (width < 1 || width > kWarpSize || (width & (width - 1))))
    fail("thread " + describe(f.thread) + " at " + site(f.file, f.line) + ": " + op_name(f.op) + " with width " +
         std::to_string(width) + " (a power of two up to 32)");
  const int segment = lane / width * width;
  switch (f.op) {
    case WarpOp::Sync:
    case WarpOp::Exchange: f.result = 0; break;  // (an exchange's results come from its combine)
    case WarpOp::Shfl: f.result = value_of(segment + ((f.lane_arg % width) + width) % width); break;
    case WarpOp::ShflUp: {
      const int source = lane - f.lane_arg;
      f.result = source < segment ? f.value : value_of(source);
      break;
    }
    case WarpOp::ShflDown: {
      const int source = lane + f.lane_arg;
      f.result = source >= segment + width ? f.value : value_of(source);
      break;
    }
    case WarpOp::ShflXor: {
      const int source = lane ^ f.lane_arg;
      f.result = source >= segment + width || source >= kWarpSize ? f.value : value_of(source);
      break;
    }
    case WarpOp::Ballot:
    case WarpOp::Any:
    case WarpOp::All: {
      uint64_t ballot = 0;
      for (int l : lanes) ballot |= (fibers[base + l].value != 0 ? 1ull : 0ull) << l;
      const uint64_t named = f.mask;
      f.result = f.op == WarpOp::Ballot ? ballot : f.op == WarpOp::Any ? ballot != 0 : ballot == named;
      break;
    }
  }
}

bool Block::meet_warp_waits() {
  bool met = false;
  for (int base = 0; base < count; base += kWarpSize) {
    const int lanes_here = std::min(kWarpSize, count - base);
    for (int l = 0; l < lanes_here; ++l) {
      Fiber& f = fibers[base + l];
      if (f.state != State::AtWarp) continue;
      std::vector<int> lanes;
      bool ready = true;
      for (int m = 0; m < kWarpSize; ++m) {
        if (!(f.mask >> m & 1u)) continue;
        if (m >= lanes_here)
          fail("thread " + describe(f.thread) + " at " + site(f.file, f.line) + ": " + op_name(f.op) +
               " names lane " + std::to_string(m) + ", which this block's last warp does not have");
        const Fiber& other = fibers[base + m];
        if (other.state == State::Exited)
          fail("thread " + describe(f.thread) + " waits at " + op_name(f.op) + " (" + site(f.file, f.line) +
               ") for lane " + std::to_string(m) + ", which exited without reaching it");
        if (other.state != State::AtWarp || other.mask != f.mask) {
          ready = false;
          break;
        }
        if (other.op != f.op || other.file != f.file || other.line != f.line)
          fail("lanes of one warp meet at different collectives: thread " + describe(f.thread) + " at " +
               op_name(f.op) + " (" + site(f.file, f.line) + "), thread " + describe(other.thread) + " at " +
               op_name(other.op) + " (" + site(other.file, other.line) + ")");
        lanes.push_back(m);
      }
      if (!ready) continue;
      if (!(f.mask >> l & 1u))
        fail("thread " + describe(f.thread) + " at " + site(f.file, f.line) + ": " + op_name(f.op) +
             " with a mask that leaves out its own lane " + std::to_string(l));
      if (f.op == WarpOp::Exchange) {
        if (lanes.size() != kWarpSize)
          fail("thread " + describe(f.thread) + " at " + site(f.file, f.line) + ": " + f.what +
               " needs all 32 lanes of the warp");
        const void* ins[kWarpSize];
        void* outs[kWarpSize];
        for (int m = 0; m < kWarpSize; ++m) {
          ins[m] = fibers[base + m].in;
          outs[m] = fibers[base + m].out;
        }
        f.combine(ins, outs);
      } else {
        for (int m : lanes) compute_collective(fibers[base + m], lanes, base);
      }
      for (int m : lanes) fibers[base + m].state = State::Runnable;
      met = true;
    }
  }
  return met;
}

bool Block::meet_barrier() {
  const Fiber* first = nullptr;
  for (int i = 0; i < count; ++i)
    if (fibers[i].state == State::AtBarrier) {
      first = &fibers[i];
      break;
    }
  if (!first) return false;
  int waiting = 0, exited = 0, predicate_count = 0;
  for (int i = 0; i < count; ++i) {
    const Fiber& f = fibers[i];
    if (f.state == State::Exited) {
      ++exited;
      continue;
    }
    if (f.state != State::AtBarrier) return false;  // at a warp collective: stuck() says so
    if (f.file != first->file || f.line != first->line || f.barrier != first->barrier)
      fail("threads wait at different barriers: thread " + describe(first->thread) + " at " +
           barrier_name(first->barrier) + " (" + site(first->file, first->line) + "), thread " + describe(f.thread) +
           " at " + barrier_name(f.barrier) + " (" + site(f.file, f.line) + ")");
    ++waiting;
    predicate_count += f.value != 0;
  }
  if (exited > 0) {
    int gone = 0;
    while (fibers[gone].state != State::Exited) ++gone;
    fail(std::string(barrier_name(first->barrier)) + " (" + site(first->file, first->line) + ") is reached by " +
         std::to_string(waiting) + " of the block's " + std::to_string(count) + " threads; thread " +
         describe(fibers[gone].thread) + " and " + std::to_string(exited - 1) + " others exited without reaching it");
  }
  uint64_t result = 0;
  switch (first->barrier) {
    case BarrierKind::Sync: break;
    case BarrierKind::Or: result = predicate_count > 0; break;
    case BarrierKind::And: result = predicate_count == waiting; break;
    case BarrierKind::Count: result = static_cast<uint64_t>(predicate_count); break;
  }
  for (int i = 0; i < count; ++i) {
    fibers[i].result = result;
    fibers[i].state = State::Runnable;
  }
  return true;
}

void Block::stuck() {
  std::string waits;
  int shown = 0;
  for (int i = 0; i < count && shown < 4; ++i) {
    const Fiber& f = fibers[i];
    if (f.state == State::AtWarp) {
      char mask[16];
      std::snprintf(mask, sizeof mask, "%08x", f.mask);
      waits += "; thread " + describe(f.thread) + " at " + op_name(f.op) + " (" + site(f.file, f.line) +
               ", mask 0x" + mask + ")";
      ++shown;
    } else if (f.state == State::AtBarrier) {
      waits += "; thread " + describe(f.thread) + " at " + barrier_name(f.barrier) + " (" + site(f.file, f.line) + ")";
      ++shown;
    }
  }
  fail("the threads wait for each other and none can go on (a collective whose lanes wait elsewhere)" + waits);
}

Block& this_threads_block() {
  static thread_local Block* block = new Block;  // kept for the OS thread's life (its stacks)
  return *block;
}

Block& in_kernel(const char* what) {
  if (!running_block || running_block->current < 0)
    throw std::logic_error(std::string(what) + " used outside a kernel on the emulated device");
  return *running_block;
}

// Suspends the running fiber until the scheduler has met its wait.
uint64_t wait_here(Block& b) {
  Fiber& f = b.running();
  void* fake_stack = nullptr;  // AddressSanitizer's, kept on this fiber's stack meanwhile
  b.asan.leave(&fake_stack);
  fiber_switch(&f.sp, b.scheduler);
  b.asan.entered(fake_stack);
  return f.result;
}

}  // namespace

const uint3& thread_index() { return in_kernel("threadIdx").running().thread; }
const uint3& block_index() { return in_kernel("blockIdx").index; }
const dim3& block_dim() { return in_kernel("blockDim").config->block; }
const dim3& grid_dim() { return in_kernel("gridDim").config->grid; }

int block_barrier(BarrierKind kind, int predicate, const char* file, int line) {
  Block& b = in_kernel(barrier_name(kind));
  Fiber& f = b.running();
  f.state = State::AtBarrier;
  f.barrier = kind;
  f.value = predicate != 0;
  f.file = file;
  f.line = line;
  return static_cast<int>(wait_here(b));
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int lane_arg, int width, const char* file,
                         int line) {
  Block& b = in_kernel(op_name(op));
  Fiber& f = b.running();
  f.state = State::AtWarp;
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.lane_arg = lane_arg;
  f.width = width;
  f.file = file;
  f.line = line;
  return wait_here(b);
}

void warp_exchange(const void* in, void* out, WarpCombine combine, const char* what, const char* file, int line) {
  Block& b = in_kernel(what);
  Fiber& f = b.running();
  f.in = in;
  f.out = out;
  f.combine = combine;
  f.what = what;
  warp_collective(WarpOp::Exchange, 0xffffffffu, 0, 0, kWarpSize, file, line);
}

void cp_async(void* dst, const void* src, size_t bytes) {
  Block& b = in_kernel("cp.async");
  b.running().copies.push_back({dst, src, bytes, -1});
}

void cp_async_commit() {
  Fiber& f = in_kernel("cp.async.commit_group").running();
  for (Fiber::Copy& c : f.copies)
    if (c.group < 0) c.group = f.committed;
  ++f.committed;
}

void cp_async_wait(int pending_groups) {
  Fiber& f = in_kernel("cp.async.wait_group").running();
  f.finish_copies(f.committed - pending_groups, false);
}

unsigned active_mask() {
  Block& b = in_kernel("__activemask");
  const int base = b.current / kWarpSize * kWarpSize;
  unsigned mask = 0;
  for (int l = 0; l < kWarpSize && base + l < b.count; ++l)
    if (b.fibers[base + l].state != State::Exited) mask |= 1u << l;
  return mask;
}

void* shared_static_bytes(int id, size_t bytes, size_t alignment) {
  Block& b = in_kernel("__shared__");
  for (const auto& [slot, memory] : b.static_shared)
    if (slot == id) return memory.get();
  if (alignment > alignof(std::max_align_t)) b.fail("a __shared__ variable aligned to more than 16 bytes");
  b.static_used += bytes;
  if (b.static_used > kStaticSharedBytes) b.fail("more than 48 KiB of static __shared__ memory");
  b.static_shared.emplace_back(id, std::unique_ptr<unsigned char[]>(new unsigned char[bytes]));
  std::memset(b.static_shared.back().second.get(), 0xFF, bytes);
  return b.static_shared.back().second.get();
}

void* shared_dynamic_bytes() { return in_kernel("extern __shared__").dynamic_shared.get(); }

void trap(const char* file, int line) { throw std::runtime_error("__trap() at " + site(file, line)); }

void run_grid(const LaunchConfig& config, const std::function<void()>& body) {
  Block& b = this_threads_block();
  if (running_block) throw std::logic_error("a kernel launched from inside a kernel (not emulated)");
  b.order = order_setting();
  for (unsigned z = 0; z < config.grid.z; ++z)
    for (unsigned y = 0; y < config.grid.y; ++y)
      for (unsigned x = 0; x < config.grid.x; ++x) b.run(config, uint3{x, y, z}, body);
}

}  // namespace palmcore_emu
