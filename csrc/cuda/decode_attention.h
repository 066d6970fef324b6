// Flash-decoding (csrc/cuda/decode_attention.cu): attention_cached split along the cache, for
// the few query rows of a decode step. cuda/attention.cu runs it instead of the plain cached
// kernel when kernel_choice() is KernelChoice::Fast and decode_attention_supports() says yes.
// Tensors as attention_cached takes them (checked by ops.cpp): float32 or bf16 storage.
#pragma once

#include "palmcore/ops.h"

namespace palmcore::cuda {

// An unsharded shape with at most 16 query heads per key/value head and head_dim <= 256 (and
// group · ceil(head_dim / 32) <= 64: the running sums a lane holds). Never throws.
bool decode_attention_supports(const AttentionShape& shape);

void decode_attention(const Tensor& q, const Tensor& slots, const Tensor& positions, const Tensor& k_cache,
                      const Tensor& v_cache, Tensor& out, const AttentionShape& shape);

}  // namespace palmcore::cuda
