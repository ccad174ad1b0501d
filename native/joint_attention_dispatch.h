// TensorRT-independent part of the mvgen::JointAttention plugin (native/joint_attention_plugin.cpp):
// plugin identity, parsing of the plugin fields the ONNX node carries (export/plugin.py), shape checks,
// launch limits and the choice of the ahead-of-time kernel variant for a GPU. Header-only, C++17, no
// CUDA or TensorRT includes, so tests/export/test_cmake.py compiles and runs it with plain g++.
//
// Field and enum values mirror TensorRT 10's headers (see the plugin source for the version followed);
// the plugin source static_asserts that they agree with nvinfer1::PluginFieldType.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace mvgen
{
namespace ja
{

// Plugin identity: `mvgen::JointAttention` version 2 (export/plugin.py: DOMAIN, OP_TYPE, OP_VERSION and the
// node attribute plugin_namespace="mvgen", through which TensorRT's ONNX parser finds the creator).
constexpr char kPluginName[] = "JointAttention";
constexpr char kPluginVersion[] = "2";
constexpr char kPluginNamespace[] = "mvgen";

// Inputs of the node, in order; the single output follows them (index kNbInputs).
enum Io : int32_t
{
    kQ = 0,
    kK = 1,
    kV = 2,
    kNVideo = 3,
    kNbInputs = 4,
    kOut = 4,
    kNbOutputs = 1,
};

// q/k/v/out element type of an AOT variant (export/aot_build.py DTYPES).
enum class Dtype : int32_t
{
    kFP16 = 0,
    kBF16 = 1,
    kFP32 = 2,
};

// Attention mask; values are kernels.joint_attention.kernel.MASK_IDS ("prototype" is not exported).
enum class Mask : int32_t
{
    kFull = 0,
    kIsolated = 1,
};

// Names used by the generated variant list (CMake writes X(fp16, 128, full, 90) entries).
constexpr Dtype kDtype_fp16 = Dtype::kFP16;
constexpr Dtype kDtype_bf16 = Dtype::kBF16;
constexpr Dtype kDtype_fp32 = Dtype::kFP32;
constexpr Mask kMask_full = Mask::kFull;
constexpr Mask kMask_isolated = Mask::kIsolated;

inline char const* dtypeName(Dtype dtype) noexcept
{
    switch (dtype)
    {
    case Dtype::kFP16: return "fp16";
    case Dtype::kBF16: return "bf16";
    case Dtype::kFP32: return "fp32";
    }
    return "?";
}

inline char const* maskName(Mask mask) noexcept
{
    return mask == Mask::kFull ? "full" : mask == Mask::kIsolated ? "isolated" : "?";
}

inline bool parseMask(std::string const& text, Mask& mask) noexcept
{
    if (text == "full")
    {
        mask = Mask::kFull;
        return true;
    }
    if (text == "isolated")
    {
        mask = Mask::kIsolated;
        return true;
    }
    return false;
}

// nvinfer1::PluginFieldType values (NvInferPluginBase.h, TensorRT 10).
namespace field_type
{
constexpr int32_t kFLOAT16 = 0;
constexpr int32_t kFLOAT32 = 1;
constexpr int32_t kFLOAT64 = 2;
constexpr int32_t kINT8 = 3;
constexpr int32_t kINT16 = 4;
constexpr int32_t kINT32 = 5;
constexpr int32_t kCHAR = 6;
constexpr int32_t kDIMS = 7;
constexpr int32_t kUNKNOWN = 8;
constexpr int32_t kBF16 = 9;
constexpr int32_t kINT64 = 10;
} // namespace field_type

// Node attributes (export/plugin.py joint_attention_node): mask, plugin_namespace. RoPE and the softmax scale
// are applied to q and k in the graph before the node (the QK prologue), so the kernel has neither.
struct Params
{
    Mask mask{Mask::kFull};
};

namespace detail
{
template <class Field>
bool readString(Field const& field, std::string& out, std::string& error)
{
    if (static_cast<int32_t>(field.type) != field_type::kCHAR || field.length < 0
        || (field.length > 0 && field.data == nullptr))
    {
        error = std::string("field '") + field.name + "' must be a string (PluginFieldType::kCHAR)";
        return false;
    }
    // the length may or may not count a terminating NUL: stop at the first NUL within it
    char const* text = static_cast<char const*>(field.data);
    std::size_t n = 0;
    while (n < static_cast<std::size_t>(field.length) && text[n] != '\0')
    {
        ++n;
    }
    out.assign(text == nullptr ? "" : text, n);
    return true;
}

template <class Field>
bool readFloat(Field const& field, float& out, std::string& error)
{
    int32_t const type = static_cast<int32_t>(field.type);
    if (field.length != 1 || field.data == nullptr || (type != field_type::kFLOAT32 && type != field_type::kFLOAT64))
    {
        error = std::string("field '") + field.name + "' must be one float (PluginFieldType::kFLOAT32)";
        return false;
    }
    double value = 0.0;
    if (type == field_type::kFLOAT32)
    {
        float f = 0.0F;
        std::memcpy(&f, field.data, sizeof(f));
        value = f;
    }
    else
    {
        std::memcpy(&value, field.data, sizeof(value));
    }
    if (!std::isfinite(value))
    {
        error = std::string("field '") + field.name + "' is not finite";
        return false;
    }
    out = static_cast<float>(value);
    return true;
}
} // namespace detail

// Parse the fields TensorRT hands to IPluginCreatorV3One::createPlugin: in the build phase the ONNX node's
// attributes (the parser passes them all, plugin_namespace included), in the runtime phase what
// getFieldsToSerialize wrote. `Field` is nvinfer1::PluginField or any struct with name/data/type/length.
// `mask` is required (it changes the semantics).
// Unknown fields are an error so that a node from a newer exporter is not silently misread.
template <class Field>
bool parseFields(Field const* fields, int32_t nbFields, Params& params, std::string& error)
{
    Params parsed;
    bool haveMask = false;
    if (nbFields < 0 || (nbFields > 0 && fields == nullptr))
    {
        error = "invalid plugin field collection";
        return false;
    }
    for (int32_t i = 0; i < nbFields; ++i)
    {
        Field const& field = fields[i];
        std::string const name = field.name == nullptr ? std::string() : std::string(field.name);
        if (name == "mask")
        {
            std::string text;
            if (!detail::readString(field, text, error))
            {
                return false;
            }
            if (!parseMask(text, parsed.mask))
            {
                error = "mask must be \"full\" or \"isolated\", got \"" + text + "\"";
                return false;
            }
            haveMask = true;
        }
        else if (name == "plugin_namespace" || name == "plugin_version")
        {
            std::string text;
            if (!detail::readString(field, text, error))
            {
                return false;
            }
            char const* expected = name == "plugin_namespace" ? kPluginNamespace : kPluginVersion;
            if (text != expected)
            {
                error = name + " must be \"" + expected + "\", got \"" + text + "\"";
                return false;
            }
        }
        else
        {
            error = "unknown plugin field '" + name + "' (expected mask, plugin_namespace)";
            return false;
        }
    }
    if (!haveMask)
    {
        error = "missing plugin field 'mask'";
        return false;
    }
    params = parsed;
    return true;
}

// Shape checks of the inputs; `Dims` is nvinfer1::Dims or any struct with nbDims and d[]. -1 (unknown at build
// time) is accepted wherever a size is compared. q, k, v [B, N, H, D]; n_video [1].
template <class Dims>
bool checkInputShapes(Dims const* in, int32_t nbInputs, std::string& error)
{
    if (nbInputs != kNbInputs)
    {
        error = "JointAttention has 4 inputs (q, k, v, n_video), got " + std::to_string(nbInputs);
        return false;
    }
    auto same = [](int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; };
    static char const* const names[kNbInputs] = {"q", "k", "v", "n_video"};
    static int32_t const ranks[kNbInputs] = {4, 4, 4, 1};
    for (int32_t i = 0; i < kNbInputs; ++i)
    {
        if (in[i].nbDims != ranks[i])
        {
            error = std::string(names[i]) + " must have rank " + std::to_string(ranks[i]) + ", got "
                + std::to_string(in[i].nbDims);
            return false;
        }
    }
    Dims const& q = in[kQ];
    for (int32_t i : {kK, kV})
    {
        for (int32_t a = 0; a < 4; ++a)
        {
            if (!same(in[i].d[a], q.d[a]))
            {
                error = std::string(names[i]) + " must have the shape of q [B, N, H, D]";
                return false;
            }
        }
    }
    if (!same(in[kNVideo].d[0], 1))
    {
        error = "n_video must be [1]";
        return false;
    }
    return true;
}

// Limits of the launch convention (export/trt_kernel.py): int32 strides inside one batch row (N*H*D), the
// grid (cdiv(N, BLOCK_M), B*H) with B*H within gridDim.y.
inline bool checkLaunchDims(int64_t batch, int64_t tokens, int64_t heads, int64_t headDim, std::string& error)
{
    if (batch < 0 || tokens < 0 || heads < 0 || headDim <= 0)
    {
        error = "invalid q shape";
        return false;
    }
    constexpr int64_t kInt32Max = 2147483647;
    if (tokens * heads * headDim > kInt32Max)
    {
        error = "N*H*D = " + std::to_string(tokens * heads * headDim) + " exceeds the kernel's int32 offsets";
        return false;
    }
    if (batch * heads > 65535)
    {
        error = "B*H = " + std::to_string(batch * heads) + " exceeds the grid's y limit (65535)";
        return false;
    }
    return true;
}

// A cubin for sm_XY runs on devices of compute capability X.Z with Z >= Y (same major): choose, among the
// variants of (dtype, headDim, mask), the one of the highest arch the device can run. `Variant` has members
// dtype, head_dim, mask, arch (e.g. 90); returns its index or -1.
template <class Variant>
int32_t selectVariant(Variant const* variants, std::size_t count, Dtype dtype, int64_t headDim, Mask mask,
    int32_t smMajor, int32_t smMinor) noexcept
{
    int32_t best = -1;
    for (std::size_t i = 0; i < count; ++i)
    {
        Variant const& v = variants[i];
        if (v.dtype != dtype || v.head_dim != headDim || v.mask != mask)
        {
            continue;
        }
        if (v.arch / 10 != smMajor || v.arch % 10 > smMinor)
        {
            continue;
        }
        if (best < 0 || v.arch > variants[best].arch)
        {
            best = static_cast<int32_t>(i);
        }
    }
    return best;
}

// Does any variant exist for this dtype (and head dim, when known) runnable on this device?
template <class Variant>
bool dtypeAvailable(Variant const* variants, std::size_t count, Dtype dtype, int64_t headDim, Mask mask,
    int32_t smMajor, int32_t smMinor) noexcept
{
    if (headDim >= 0)
    {
        return selectVariant(variants, count, dtype, headDim, mask, smMajor, smMinor) >= 0;
    }
    for (std::size_t i = 0; i < count; ++i)
    {
        if (selectVariant(variants, count, dtype, variants[i].head_dim, mask, smMajor, smMinor) >= 0)
        {
            return true;
        }
    }
    return false;
}

// "fp16 d128 full sm90, bf16 d128 full sm90, ..." for error messages.
template <class Variant>
std::string describeVariants(Variant const* variants, std::size_t count)
{
    std::string text;
    for (std::size_t i = 0; i < count; ++i)
    {
        if (!text.empty())
        {
            text += ", ";
        }
        text += std::string(dtypeName(variants[i].dtype)) + " d" + std::to_string(variants[i].head_dim) + " "
            + maskName(variants[i].mask) + " sm" + std::to_string(variants[i].arch);
    }
    return text.empty() ? std::string("none") : text;
}

} // namespace ja
} // namespace mvgen
