#include "palmcore/tensor.h"

#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

#include "palmcore/memory.h"
#include "palmcore/ops.h"
#ifdef PALMCORE_CUDA
#include "cuda/cuda_ops.h"
#endif

namespace palmcore {

const char* device_name(Device device) { return device == Device::CPU ? "cpu" : "cuda"; }

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "float32";
    case DType::I32: return "int32";
    case DType::BF16: return "bfloat16";
    case DType::F64: return "float64";
    case DType::I8: return "int8";
  }
  return "?";
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F32: return sizeof(float);
    case DType::I32: return sizeof(int32_t);
    case DType::BF16: return sizeof(bf16);
    case DType::F64: return sizeof(double);
    case DType::I8: return sizeof(int8_t);
  }
  return 0;
}

static std::string format_shape(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

Buffer::Buffer(Device device, size_t bytes, const std::vector<int64_t>& shape)
    : device_(device), bytes_(bytes), data_(nullptr) {
  if (device == Device::CUDA) {
#ifdef PALMCORE_CUDA
    data_ = cuda::allocate(bytes, "a tensor of shape " + format_shape(shape));  // counted there
    return;
#else
    throw std::runtime_error("palmcore was built without CUDA (PALMCORE_CUDA=OFF, or no nvcc found when it was built)");
#endif
  }
  if (!try_count_allocation(bytes))
    throw std::invalid_argument(out_of_memory_message("palmcore", bytes, "a tensor of shape " + format_shape(shape)));
  // 64-byte alignment: one cache line, one AVX-512 vector.
  size_t rounded = (bytes + 63) / 64 * 64;
  data_ = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  if (data_ == nullptr) {
    count_release(bytes);
    throw std::bad_alloc();
  }
}

Buffer::~Buffer() {
  if (!owned_) return;
#ifdef PALMCORE_CUDA
  if (device_ == Device::CUDA) {
    cuda::release(data_, bytes_);  // counted there
    return;
  }
#endif
  std::free(data_);
  count_release(bytes_);
}

Tensor Tensor::zeros(std::vector<int64_t> shape, DType dtype, Device device) {
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  int64_t bytes = static_cast<int64_t>(dtype_size(dtype));
  for (int64_t extent : t.shape_)
    if (extent < 0 || __builtin_mul_overflow(bytes, extent, &bytes))
      throw std::invalid_argument("tensor of shape " + t.shape_string() + " is too large");
  t.buffer_ = std::make_shared<Buffer>(device, static_cast<size_t>(bytes), t.shape_);
  fill_zero(t);
  return t;
}

Tensor Tensor::borrow(void* data, std::vector<int64_t> shape, DType dtype, Device device) {
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.buffer_ = std::make_shared<Buffer>(device, data, static_cast<size_t>(t.numel()) * dtype_size(dtype));
  return t;
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t extent : shape_) n *= extent;
  return n;
}

std::string Tensor::shape_string() const { return format_shape(shape_); }

Tensor Tensor::view(int64_t element_offset, std::vector<int64_t> shape) const {
  Tensor t = *this;
  t.shape_ = std::move(shape);
  t.byte_offset_ = byte_offset_ + static_cast<size_t>(element_offset) * dtype_size(dtype_);
  if (element_offset < 0 || t.byte_offset_ + t.numel() * dtype_size(dtype_) > buffer_->bytes())
    throw std::out_of_range("tensor view outside its buffer");
  return t;
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  std::vector<int64_t> shape = shape_;
  shape[0] = end - begin;
  return view(begin * (numel() / shape_[0]), std::move(shape));
}

Tensor Tensor::reshape(std::vector<int64_t> shape) const {
  Tensor t = view(0, std::move(shape));
  if (t.numel() != numel()) throw std::invalid_argument("reshape changes the number of elements");
  return t;
}

void Tensor::check_dtype(DType want) const {
  if (dtype_ != want)
    throw std::logic_error(std::string("a ") + dtype_name(dtype_) + " tensor of shape " + shape_string() +
                           " was read as " + dtype_name(want));
}

void Tensor::check_on_host() const {
  if (device() != Device::CPU)
    throw std::logic_error("a tensor of shape " + shape_string() + " on " + device_name(device()) +
                           " was read on the host (copy it there first)");
}

Tensor Tensor::to(Device device) const {
  if (device == this->device()) return *this;
  Tensor t = zeros(shape_, dtype_, device);
  copy(*this, t);
  return t;
}

}  // namespace palmcore
