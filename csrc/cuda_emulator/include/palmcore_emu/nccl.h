// NCCL on the emulated device (csrc/cuda_emulator/nccl.cpp): one rank only. The NCCL library
// found (for its version, unique ids and error strings: none of which needs a GPU) keeps those;
// the communicator's calls are replaced by the emulator's single-rank ones, for which every
// collective is a device-to-device copy (or nothing, in place) on the stream. A communicator of
// more than one rank is refused: "NCCL is not emulated beyond one rank".
#pragma once

#include "comm/nccl_library.h"

namespace palmcore_emu {

void use_single_rank_nccl(palmcore::nccl::Library& lib);

}  // namespace palmcore_emu
