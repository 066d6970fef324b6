// Flash attention on tensor cores (csrc/cuda/flash_attention.cu): the fast kernels beside the
// plain ones of cuda/attention.cu, which cuda/attention.cu calls instead of its own when
// kernel_choice() is KernelChoice::Fast and flash_attention_supports() says yes. The math is
// attention_forward's and attention_backward's (palmcore/op_signatures.inc); tensors are
// checked by ops.cpp (one device, shapes), and bf16 storage is what these kernels take:
// q, k, v, out, dout, dq, dk, dv bfloat16, lse and row_dot float32.
//
// Numerics against the CPU bf16 oracle: scores and sums in float32 on tensor cores (bf16
// inputs), p rounded to bf16 before p·V and ds' rounded to bf16 before ds'·K and ds'ᵀ·Q, as
// the oracle rounds them; the online softmax rescales by the running max, so the normalisation
// happens in another order than the oracle's (not bit-identical: within bf16 tolerance).
// Deterministic: no atomics, every sum in a fixed order.
#pragma once

#include <initializer_list>

#include "palmcore/ops.h"

namespace palmcore::cuda {

// True when the flash kernels handle this shape with tensors of `dtype`: bf16 storage with
// shape.bf16, the head dimensions they are built for, a device of sm_80 or newer with the
// shared memory they take; otherwise the plain kernels run. Never throws.
bool flash_attention_supports(const AttentionShape& shape, DType dtype);
// True when the tensors the kernels load are 16-byte aligned and those they store 4-byte aligned
// (a view at an odd offset runs the plain kernels instead).
bool flash_attention_aligned(std::initializer_list<const Tensor*> loaded, std::initializer_list<const Tensor*> stored);

void flash_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse,
                             const AttentionShape& shape);
// row_dot: float32 [B·H·T] scratch (AttentionWorkspace::row_dot) for D_i = dout_i · out_i.
void flash_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                              const Tensor& lse, const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv,
                              const AttentionShape& shape, Tensor& row_dot);

}  // namespace palmcore::cuda
