// The memory guard: what the machine can still give, an optional cap on what palmcore itself
// holds, and the count of palmcore's live allocations. Buffer (palmcore/tensor.h) counts every
// allocation it owns and refuses one that does not fit; the model and the key/value cache check
// their whole size before building anything (a refusal is std::invalid_argument, ValueError in
// Python, stating the bytes needed and available).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace palmcore {

// Allocations at least this large are checked against available_memory_bytes() (which reads
// /proc); smaller ones only against the limit, so that they stay cheap.
constexpr uint64_t kCheckedAllocationBytes = uint64_t{1} << 20;

// Bytes the machine can still give this process: the smaller of /proc/meminfo's MemAvailable
// and, under a cgroup v2 memory limit, that limit's headroom; the physical memory when /proc
// cannot be read.
uint64_t available_memory_bytes();

// A process-wide cap on the bytes of palmcore's live allocations; 0 (the default) means none.
void set_memory_limit(uint64_t bytes);
uint64_t memory_limit();
// Bytes of the buffers palmcore owns now.
uint64_t allocated_bytes();
// Bytes palmcore may still allocate: available_memory_bytes(), and under a limit no more than
// its headroom.
uint64_t allocatable_bytes();

// Counts `bytes` as allocated unless they do not fit: then counts nothing and returns false.
// They fit if the limit (when set) still holds with them and, for kCheckedAllocationBytes or
// more, if they are at most available_memory_bytes().
bool try_count_allocation(uint64_t bytes);
void count_release(uint64_t bytes);

// "out of memory: <who> needs 4.00 GiB (4294967296 bytes) for <what> but 2.10 GiB (...) are
// available", and palmcore's limit and use when a limit is set.
std::string out_of_memory_message(const std::string& who, uint64_t bytes, const std::string& what);
// Throws std::invalid_argument with that message if `bytes` exceed allocatable_bytes().
void require_memory(const std::string& who, uint64_t bytes, const std::string& what);

// Device memory (the CUDA backend's buffers), counted per device apart from the host's; the
// backend checks each allocation against the device's free memory (cudaMemGetInfo), which it
// alone can read. Devices 0..kMaxCountedDevices-1.
constexpr int kMaxCountedDevices = 64;
void count_device_allocation(int device, uint64_t bytes);
void count_device_release(int device, uint64_t bytes);
// Bytes of the buffers palmcore owns now on `device` (0 for a device out of range).
uint64_t device_allocated_bytes(int device);
// "out of memory: palmcore needs 4.00 GiB (...) for <what> on cuda:0 but 2.10 GiB (...) are free there"
std::string device_out_of_memory_message(int device, uint64_t bytes, const std::string& what, uint64_t free_bytes);

}  // namespace palmcore
