// Tensor: a shaped, typed view of memory that lives on one device.
//
// A Tensor shares ownership of a Buffer (the allocation) and names a contiguous, row-major
// window of it: byte offset, shape and dtype. Views of one buffer are cheap (the model keeps
// every parameter as a view into one flat buffer). Every op dispatches on `device()`; the CPU
// backend is the only one built so far, a CUDA one slots in behind the same dispatch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "palmcore/math/bf16.h"

namespace palmcore {

enum class Device { CPU, CUDA };
enum class DType { F32, I32, BF16, F64, I8 };

const char* device_name(Device device);
const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);

// The dtype an element type stands for (data<T>() checks it).
template <typename T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() { return DType::F32; }
template <>
constexpr DType dtype_of<int32_t>() { return DType::I32; }
template <>
constexpr DType dtype_of<bf16>() { return DType::BF16; }
template <>
constexpr DType dtype_of<double>() { return DType::F64; }
template <>
constexpr DType dtype_of<int8_t>() { return DType::I8; }

// One allocation on one device, freed when the last tensor viewing it goes away.
class Buffer {
 public:
  // Counted in allocated_bytes() (palmcore/memory.h) while it lives. Throws
  // std::invalid_argument, naming `shape` (the tensor it is for), if the bytes do not fit under
  // palmcore's memory limit or, from 1 MiB on, in the memory available.
  Buffer(Device device, size_t bytes, const std::vector<int64_t>& shape);
  // Borrowed memory (a caller's array): never freed here; the caller keeps it alive.
  Buffer(Device device, void* borrowed, size_t bytes)
      : device_(device), bytes_(bytes), data_(borrowed), owned_(false) {}
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  Device device_;
  size_t bytes_;
  void* data_;
  bool owned_ = true;
};

class Tensor {
 public:
  Tensor() = default;
  // A new zero-filled tensor.
  static Tensor zeros(std::vector<int64_t> shape, DType dtype = DType::F32, Device device = Device::CPU);
  // A view of memory the caller owns and keeps alive while the tensor is used.
  static Tensor borrow(void* data, std::vector<int64_t> shape, DType dtype, Device device = Device::CPU);

  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const;
  DType dtype() const { return dtype_; }
  Device device() const { return buffer_->device(); }
  bool defined() const { return buffer_ != nullptr; }
  std::string shape_string() const;

  // A view of `shape` starting `element_offset` elements into this tensor.
  Tensor view(int64_t element_offset, std::vector<int64_t> shape) const;
  // Rows [begin, end) of the leading dimension.
  Tensor rows(int64_t begin, int64_t end) const;
  // The same elements seen with another shape of equal size.
  Tensor reshape(std::vector<int64_t> shape) const;

  // The elements, on the tensor's device; T must be the tensor's dtype.
  template <typename T>
  T* data() const {
    check_dtype(dtype_of<T>());
    return static_cast<T*>(raw_data());
  }
  // The elements where the host can touch them: the tensor must be on the CPU (copy a device
  // tensor to the host first: Tensor::to).
  template <typename T>
  T* host_data() const {
    check_on_host();
    return data<T>();
  }
  // The first byte, untyped (for copies of raw bytes).
  void* raw_data() const { return static_cast<char*>(buffer_->data()) + byte_offset_; }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }

  // A copy on `device` (this tensor itself when it is already there).
  Tensor to(Device device) const;

 private:
  void check_dtype(DType want) const;
  void check_on_host() const;

  std::shared_ptr<Buffer> buffer_;
  size_t byte_offset_ = 0;
  std::vector<int64_t> shape_;
  DType dtype_ = DType::F32;
};

}  // namespace palmcore
