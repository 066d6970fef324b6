// Finding and opening libnccl.so.2 (comm/nccl_library.h says where it is looked for), and the
// two calls that need no GPU: the version and a new unique id. Compiled in every build, so
// that the lookup and its errors work (and are tested) on machines without CUDA.
#include "comm/nccl_library.h"

#include <dlfcn.h>
#include <link.h>
#include <sys/stat.h>

#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include "palmcore/communicator.h"

#ifdef PALMCORE_CUDA_EMULATED
#include "palmcore_emu/nccl.h"
#endif

namespace palmcore::nccl {
namespace {

constexpr const char* kSoname = "libnccl.so.2";

std::string dl_error() {
  const char* e = dlerror();
  return e ? e : "unknown error";
}

// The file PALMCORE_NCCL_LIBRARY names: itself, or libnccl.so.2 in the folder it names.
std::string from_environment(const std::string& value) {
  struct stat info {};
  if (stat(value.c_str(), &info) == 0 && S_ISDIR(info.st_mode)) return value + "/" + kSoname;
  return value;
}

// The file the loader took a library from (for messages and `palmcore info`).
std::string loaded_path(void* handle) {
  link_map* map = nullptr;
  return dlinfo(handle, RTLD_DI_LINKMAP, &map) == 0 && map && map->l_name && *map->l_name ? map->l_name : kSoname;
}

Library open_library() {
  const char* variable = std::getenv("PALMCORE_NCCL_LIBRARY");
  void* handle = nullptr;
  if (variable && *variable) {
    const std::string file = from_environment(variable);
    handle = dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle)
      throw std::runtime_error("NCCL not found: PALMCORE_NCCL_LIBRARY=" + std::string(variable) + " names no loadable " +
                               kSoname + " (" + dl_error() + ")");
  } else {
    handle = dlopen(kSoname, RTLD_NOW | RTLD_LOCAL);
    if (!handle)
      throw std::runtime_error(std::string("NCCL not found: ") + kSoname +
                               " is not on the library path (pip install nvidia-nccl-cu13, or install NCCL and "
                               "add its lib folder to LD_LIBRARY_PATH, or set PALMCORE_NCCL_LIBRARY to the "
                               "library or its folder): " + dl_error());
  }
  Library lib;
  lib.path = loaded_path(handle);
  auto get = [&](auto& fn, const char* name) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(handle, name));
    if (!fn) throw std::runtime_error("NCCL library " + lib.path + " has no " + name + ": it is not NCCL 2");
  };
  get(lib.get_version, "ncclGetVersion");
  get(lib.get_unique_id, "ncclGetUniqueId");
  get(lib.comm_init_rank, "ncclCommInitRank");
  get(lib.comm_destroy, "ncclCommDestroy");
  get(lib.get_error_string, "ncclGetErrorString");
  get(lib.get_last_error, "ncclGetLastError");
  get(lib.all_reduce, "ncclAllReduce");
  get(lib.reduce_scatter, "ncclReduceScatter");
  get(lib.all_gather, "ncclAllGather");
  if (lib.get_version(&lib.version) != kSuccess || lib.version < 21000 || lib.version >= 30000)
    throw std::runtime_error("NCCL library " + lib.path + " reports version " + std::to_string(lib.version) +
                             "; palmcore needs NCCL 2.10 or newer with major version 2 (bfloat16, the ABI it uses)");
#ifdef PALMCORE_CUDA_EMULATED
  palmcore_emu::use_single_rank_nccl(lib);  // the emulated device has no GPU for NCCL's own calls
#endif
  return lib;
}

}  // namespace

const Library& library() {
  // Not cached on failure: a later call (after the environment was fixed) tries again.
  static std::mutex mutex;
  static std::unique_ptr<Library> opened;
  std::lock_guard<std::mutex> lock(mutex);
  if (!opened) opened = std::make_unique<Library>(open_library());
  return *opened;
}

void check(Result result, const char* what, Comm comm) {
  if (result == kSuccess) return;
  const Library& lib = library();
  std::string message = std::string(what) + ": " + lib.get_error_string(result);
  const char* last = lib.get_last_error(comm);
  if (last && *last) message += std::string(" (") + last + ")";
  throw std::runtime_error(message);
}

}  // namespace palmcore::nccl

namespace palmcore {

std::pair<int, std::string> nccl_library_info() {
  const nccl::Library& lib = nccl::library();
  return {lib.version, lib.path};
}

std::string nccl_unique_id() {
  nccl::UniqueId id{};
  nccl::check(nccl::library().get_unique_id(&id), "ncclGetUniqueId");
  return std::string(id.internal, sizeof(id.internal));
}

}  // namespace palmcore
