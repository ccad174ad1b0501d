// The table of ahead-of-time joint-attention launchers (the entry points of libmvgen_triton_kernels.so; the
// plugin libraries compile the same generated sources in), for the TensorRT plugin
// (native/joint_attention_plugin.cpp). Needs CUDA's cuda.h and two headers generated in the build
// tree (<build>/aot): mvgen_joint_attention.h (export/aot_build.py: one C entry point + load_ per variant)
// and mvgen_ja_variants.h (CMakeLists.txt: MVGEN_JA_FOR_EACH_VARIANT(X), one X(dtype, head_dim, mask, arch)
// per variant that was compiled). No TensorRT include: tests/export/test_cmake.py builds this with g++.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda.h> // before the extern "C" block: the generated headers include it again (guarded)
#include <stdint.h>

extern "C"
{
#include "mvgen_joint_attention.h"
}
#include "mvgen_ja_variants.h"

#include "joint_attention_dispatch.h"

namespace mvgen
{
namespace ja
{

// The linked entry point of one variant (triton.tools.link): the grid is computed inside from n_tokens,
// n_heads and batch; algo_id selects among linked configurations (one per variant: 0).
using LaunchFn = CUresult (*)(CUstream stream, CUdeviceptr q, CUdeviceptr k, CUdeviceptr v, CUdeviceptr nVideo,
    int32_t nTokens, int32_t nHeads, int32_t batch, CUdeviceptr out, int algoId);
// Loads the variant's cubin into the *current* CUDA context (cuModuleLoadData). Triton's generated loader
// calls exit() on any CUDA error, so the plugin calls it only with a current context on a device the cubin
// was built for.
using LoadFn = void (*)(void);

struct Launcher
{
    Dtype dtype;
    int32_t head_dim;
    Mask mask;
    int32_t arch;
    LaunchFn launch;
    LoadFn load;
    char const* name;
};

#define MVGEN_JA_LAUNCHER_ENTRY(dt, hd, mk, sm)                                                                  \
    Launcher{kDtype_##dt, hd, kMask_##mk, sm, &mvgen_ja_##dt##_d##hd##_##mk##_sm##sm,                            \
        &load_mvgen_ja_##dt##_d##hd##_##mk##_sm##sm, "mvgen_ja_" #dt "_d" #hd "_" #mk "_sm" #sm},

inline constexpr Launcher kLaunchers[] = {MVGEN_JA_FOR_EACH_VARIANT(MVGEN_JA_LAUNCHER_ENTRY)};

#undef MVGEN_JA_LAUNCHER_ENTRY

inline constexpr std::size_t kNbLaunchers = sizeof(kLaunchers) / sizeof(kLaunchers[0]);

} // namespace ja
} // namespace mvgen
