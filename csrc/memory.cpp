#include "palmcore/memory.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace palmcore {

namespace {

std::atomic<uint64_t> live_bytes{0};
std::atomic<uint64_t> limit_bytes{0};
std::atomic<uint64_t> device_live_bytes[kMaxCountedDevices];

// The number after `key` in a file of "key number ..." lines (/proc/meminfo, memory.stat).
bool read_keyed(const char* path, const char* key, uint64_t& value) {
  FILE* f = std::fopen(path, "r");
  if (!f) return false;
  char name[64];
  unsigned long long number = 0;
  bool found = false;
  while (!found && std::fscanf(f, "%63s %llu%*[^\n]", name, &number) == 2) found = std::strcmp(name, key) == 0;
  std::fclose(f);
  if (found) value = number;
  return found;
}

// A file holding one number (a cgroup's memory.max or memory.current); false for "max".
bool read_number(const char* path, uint64_t& value) {
  FILE* f = std::fopen(path, "r");
  if (!f) return false;
  unsigned long long number = 0;
  const bool ok = std::fscanf(f, "%llu", &number) == 1;
  std::fclose(f);
  if (ok) value = number;
  return ok;
}

// "4.00 GiB (4294967296 bytes)": three significant digits in binary units, then the exact count.
std::string describe(uint64_t bytes) {
  if (bytes < 1024) return std::to_string(bytes) + " bytes";
  static const char* const units[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double value = static_cast<double>(bytes) / 1024;
  int unit = 0;
  for (; value >= 1024 && unit < 5; ++unit) value /= 1024;
  char text[32];
  std::snprintf(text, sizeof text, value < 10 ? "%.2f %s" : value < 100 ? "%.1f %s" : "%.0f %s", value, units[unit]);
  return std::string(text) + " (" + std::to_string(bytes) + " bytes)";
}

}  // namespace

uint64_t available_memory_bytes() {
  uint64_t available = 0;
  if (read_keyed("/proc/meminfo", "MemAvailable:", available)) {
    available *= 1024;  // kB
  } else {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    available = pages > 0 && page > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page)
                                      : std::numeric_limits<uint64_t>::max();  // unknown: refuse nothing
  }
  uint64_t max = 0, current = 0;
  if (read_number("/sys/fs/cgroup/memory.max", max) && read_number("/sys/fs/cgroup/memory.current", current)) {
    // The group's inactive file cache is reclaimed before the group runs out (MemAvailable
    // counts it as available too), so it is not counted as used.
    uint64_t reclaimable = 0;
    read_keyed("/sys/fs/cgroup/memory.stat", "inactive_file", reclaimable);
    const uint64_t used = current - std::min(current, reclaimable);
    available = std::min(available, max > used ? max - used : 0);
  }
  // A limit on the process's address space (ulimit -v) is reached before the machine runs out.
  rlimit address_space{};
  uint64_t pages = 0;
  if (getrlimit(RLIMIT_AS, &address_space) == 0 && address_space.rlim_cur != RLIM_INFINITY &&
      read_number("/proc/self/statm", pages)) {
    const uint64_t mapped = pages * static_cast<uint64_t>(sysconf(_SC_PAGE_SIZE));
    const uint64_t cap = static_cast<uint64_t>(address_space.rlim_cur);
    available = std::min(available, cap > mapped ? cap - mapped : 0);
  }
  return available;
}

void set_memory_limit(uint64_t bytes) { limit_bytes.store(bytes); }

uint64_t memory_limit() { return limit_bytes.load(); }

uint64_t allocated_bytes() { return live_bytes.load(); }

uint64_t allocatable_bytes() {
  const uint64_t available = available_memory_bytes(), limit = memory_limit(), live = allocated_bytes();
  return limit == 0 ? available : std::min(available, limit > live ? limit - live : 0);
}

bool try_count_allocation(uint64_t bytes) {
  if (bytes >= kCheckedAllocationBytes && bytes > available_memory_bytes()) return false;
  const uint64_t limit = memory_limit();
  uint64_t live = live_bytes.load();
  do {
    if (limit != 0 && (bytes > limit || live > limit - bytes)) return false;
  } while (!live_bytes.compare_exchange_weak(live, live + bytes));
  return true;
}

void count_release(uint64_t bytes) { live_bytes.fetch_sub(bytes); }

std::string out_of_memory_message(const std::string& who, uint64_t bytes, const std::string& what) {
  std::string message = "out of memory: " + who + " needs " + describe(bytes) + " for " + what + " but " +
                        describe(allocatable_bytes()) + " are available";
  if (const uint64_t limit = memory_limit())
    message += "; palmcore's memory limit is " + describe(limit) + ", of which " + describe(allocated_bytes()) +
               " are in use";
  return message;
}

static bool counted(int device) { return device >= 0 && device < kMaxCountedDevices; }

void count_device_allocation(int device, uint64_t bytes) {
  if (counted(device)) device_live_bytes[device].fetch_add(bytes);
}

void count_device_release(int device, uint64_t bytes) {
  if (counted(device)) device_live_bytes[device].fetch_sub(bytes);
}

uint64_t device_allocated_bytes(int device) { return counted(device) ? device_live_bytes[device].load() : 0; }

std::string device_out_of_memory_message(int device, uint64_t bytes, const std::string& what, uint64_t free_bytes) {
  return "out of memory: palmcore needs " + describe(bytes) + " for " + what + " on cuda:" + std::to_string(device) +
         " but " + describe(free_bytes) + " are free there (palmcore holds " +
         describe(device_allocated_bytes(device)) + " of it)";
}

void require_memory(const std::string& who, uint64_t bytes, const std::string& what) {
  if (bytes > allocatable_bytes()) throw std::invalid_argument(out_of_memory_message(who, bytes, what));
}

}  // namespace palmcore
