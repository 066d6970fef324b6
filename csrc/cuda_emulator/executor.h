// The emulated device's grid execution (executor.cpp), for runtime.cpp.
#pragma once

#include <functional>

#include "palmcore_emu/device.h"

namespace palmcore_emu {

// Runs every block of the grid (the configuration already checked) on the calling thread; throws
// std::runtime_error naming the block and thread when the kernel fails.
void run_grid(const LaunchConfig& config, const std::function<void()>& body);

}  // namespace palmcore_emu
