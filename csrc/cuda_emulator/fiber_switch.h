// Switching between the emulator's fibers (executor.cpp) on x86-64: a stack pointer swap that
// saves the callee-saved registers and the floating-point control words, as the System V ABI
// asks a call to preserve. (glibc's swapcontext does this too but also saves the signal mask
// with a system call at every switch, which made the emulator several times slower.)
#pragma once

#include <cstddef>
#include <cstdint>

#if !defined(__x86_64__)
#error "the CUDA emulator's fibers are written for x86-64 (csrc/cuda_emulator/fiber_switch.h)"
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Saves the running context's stack pointer in *save and continues the one saved in `load`.
extern "C" void palmcore_emu_fiber_switch(void** save, void* load);

namespace palmcore_emu {

inline void fiber_switch(void** save, void* load) { palmcore_emu_fiber_switch(save, load); }

// The stack pointer of a fiber that has not run yet: the first switch to it enters `start`
// (which must never return) with the stack [stack, stack + bytes) aligned as after a call.
inline void* fiber_stack_start(char* stack, size_t bytes, void (*start)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15};
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                             // start's return address: none
  *--sp = reinterpret_cast<void*>(start);      // where the switch's `ret` goes
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12..r15
  uint32_t control[2];
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
  *--sp = nullptr;
  __builtin_memcpy(sp, control, sizeof control);  // the current MXCSR and x87 control word
  return sp;
}

// AddressSanitizer's bookkeeping of the switches (its fake stacks and stack bounds); nothing
// without it. The scheduler calls enter() before switching to a fiber and back() after; a fiber
// calls entered() after each switch into it and leave() before each switch out (null: for good).
// reuse() forgets what the frames of a stack's last fiber left poisoned, before it starts anew.
struct FiberStacks {
#if defined(__SANITIZE_ADDRESS__)
  void reuse(char* stack, size_t bytes) { __asan_unpoison_memory_region(stack, bytes); }
  const void* scheduler_bottom = nullptr;
  size_t scheduler_size = 0;
  void* scheduler_fake = nullptr;
  void enter(const void* bottom, size_t size) { __sanitizer_start_switch_fiber(&scheduler_fake, bottom, size); }
  void back() { __sanitizer_finish_switch_fiber(scheduler_fake, nullptr, nullptr); }
  void entered(void* fake) { __sanitizer_finish_switch_fiber(fake, &scheduler_bottom, &scheduler_size); }
  void leave(void** fake) { __sanitizer_start_switch_fiber(fake, scheduler_bottom, scheduler_size); }
#else
  void reuse(char*, size_t) {}
  void enter(const void*, size_t) {}
  void back() {}
  void entered(void*) {}
  void leave(void**) {}
#endif
};

}  // namespace palmcore_emu
