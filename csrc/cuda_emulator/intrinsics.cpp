// The device intrinsics that must round exactly as written: out of line, so that the host
// compiler cannot contract them with the caller's arithmetic into an FMA (nvcc never does).
#include "palmcore_emu/device.h"

namespace palmcore_emu {

float mul_rn(float x, float y) { return x * y; }
float add_rn(float x, float y) { return x + y; }
float sub_rn(float x, float y) { return x - y; }
double add_rn(double x, double y) { return x + y; }

}  // namespace palmcore_emu
