// mvgen::JointAttention (version 1): a TensorRT IPluginV3 over the ahead-of-time compiled Triton joint-attention
// kernel (export/aot_build.py's C launchers + cubins, compiled into this library), for engines parsed from ONNX
// graphs exported with `mvgen export onnx --attention plugin` (node contract: export/plugin.py, export/README.md).
//
// TensorRT API followed: TensorRT 10 (>= 10.0; checked up to 10.16). Every override below was written against
// the header text of the NVIDIA/TensorRT OSS `include/` directory of the 10.x line -- NvInferPluginBase.h
// (PluginField, PluginFieldType, PluginFieldCollection, TensorRTPhase, PluginCapabilityType, v_1_0::IPluginV3,
// IPluginCreatorInterface), NvInferRuntime.h (IPluginResourceContext, v_1_0::IPluginV3OneCore / IPluginV3OneBuild /
// IPluginV3OneRuntime, DynamicPluginTensorDesc, ILoggerFinder, getPluginRegistry), NvInferRuntimePlugin.h
// (PluginTensorDesc), NvInferRuntimeCommon.h (IPluginRegistry::registerCreator(IPluginCreatorInterface&, ...),
// loadLibrary) -- and the TensorRT 10.0.1 / 10.14.1 / 10.16.1 C++ API reference member lists of
// v_1_0::IPluginCreatorV3One and v_1_0::IPluginV3OneBuild (the same signatures in all of them). It has not been
// compiled against those headers on the machine it was written on (TensorRT cannot be installed there); the
// TensorRT-independent logic lives in joint_attention_dispatch.h and is compiled and run by
// tests/export/test_cmake.py.
//
// One source, two libraries (CMakeLists.txt), because TensorRT's two ways of loading a plugin library exclude
// each other -- IPluginRegistry::loadLibrary "will fail and return nullptr if any of the plugins are already
// registered", so a library that registers itself when it is dlopen()ed cannot also be loaded through it:
//   libmvgen_trt_plugin.so          (MVGEN_TRT_STATIC_REGISTRATION=1) registers its creator when it is loaded:
//                                   tritonserver --backend-config=tensorrt,plugins=<path> (the TensorRT backend
//                                   dlopen()s each path), trtexec --staticPlugins, ctypes.CDLL in Python;
//   libmvgen_trt_plugin_dynamic.so  (MVGEN_TRT_STATIC_REGISTRATION=0) exports setLoggerFinder + getCreators for
//                                   IPluginRegistry::loadLibrary: trtexec --dynamicPlugins (and
//                                   --setPluginsToSerialize), registry.load_library() in Python.
//
// Kernel selection: the variants compiled in (CMake MVGEN_AOT_ARCHS x DTYPES x
// HEAD_DIMS x MASKS) are listed by native/joint_attention_launchers.h; the plugin picks the one matching q's
// dtype, the head dim, the mask attribute and the device's compute capability (queried once per plugin object in
// configurePlugin / onShapeChange). RoPE and the softmax scale are applied to q and k in the graph before the
// node (export/plugin.py), so the kernels take rotated, scaled q/k. Triton's generated loaders keep one CUmodule per variant in process-wide globals: all
// engines of a process that use this plugin must run in one CUDA context (one GPU per process).
#include <NvInferRuntime.h>
#include <NvInferVersion.h>
#include <cuda.h>
#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include "joint_attention_dispatch.h"
#include "joint_attention_launchers.h"

#ifndef MVGEN_TRT_STATIC_REGISTRATION
#define MVGEN_TRT_STATIC_REGISTRATION 1
#endif

static_assert(NV_TENSORRT_MAJOR >= 10, "mvgen::JointAttention is an IPluginV3 plugin: it needs TensorRT >= 10.0");
static_assert(static_cast<int32_t>(nvinfer1::PluginFieldType::kFLOAT32) == mvgen::ja::field_type::kFLOAT32
        && static_cast<int32_t>(nvinfer1::PluginFieldType::kFLOAT64) == mvgen::ja::field_type::kFLOAT64
        && static_cast<int32_t>(nvinfer1::PluginFieldType::kCHAR) == mvgen::ja::field_type::kCHAR,
    "joint_attention_dispatch.h field_type values must match nvinfer1::PluginFieldType");

namespace mvgen
{
namespace ja
{
namespace
{

using nvinfer1::AsciiChar;
using nvinfer1::DataType;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::IExprBuilder;
using nvinfer1::ILogger;
using nvinfer1::IPluginCapability;
using nvinfer1::IPluginCreatorInterface;
using nvinfer1::IPluginCreatorV3One;
using nvinfer1::IPluginResourceContext;
using nvinfer1::IPluginV3;
using nvinfer1::IPluginV3OneBuild;
using nvinfer1::IPluginV3OneCore;
using nvinfer1::IPluginV3OneRuntime;
using nvinfer1::PluginCapabilityType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;
using nvinfer1::TensorRTPhase;

// ---- logging ------------------------------------------------------------------------------------------------
std::mutex gLoggerMutex;
nvinfer1::ILoggerFinder* gLoggerFinder{nullptr};

void setLoggerFinderImpl(nvinfer1::ILoggerFinder* finder) noexcept
{
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    if (gLoggerFinder == nullptr && finder != nullptr)
    {
        gLoggerFinder = finder;
    }
}

// Through TensorRT's logger when the library was loaded by IPluginRegistry::loadLibrary (setLoggerFinder), else
// warnings and errors to stderr.
void logMessage(ILogger::Severity severity, std::string const& message) noexcept
{
    try
    {
        std::string const text = std::string("[mvgen::JointAttention] ") + message;
        ILogger* logger{nullptr};
        {
            std::lock_guard<std::mutex> lock(gLoggerMutex);
            if (gLoggerFinder != nullptr)
            {
                logger = gLoggerFinder->findLogger();
            }
        }
        if (logger != nullptr)
        {
            logger->log(severity, text.c_str());
        }
        else if (severity == ILogger::Severity::kERROR || severity == ILogger::Severity::kINTERNAL_ERROR
            || severity == ILogger::Severity::kWARNING)
        {
            std::fprintf(stderr, "%s\n", text.c_str());
        }
    }
    catch (...)
    {
    }
}

void logError(std::string const& message) noexcept
{
    logMessage(ILogger::Severity::kERROR, message);
}

// ---- device / kernel helpers ----------------------------------------------------------------------------------
bool toDtype(DataType type, Dtype& dtype) noexcept
{
    switch (type)
    {
    case DataType::kHALF: dtype = Dtype::kFP16; return true;
    case DataType::kBF16: dtype = Dtype::kBF16; return true;
    case DataType::kFLOAT: dtype = Dtype::kFP32; return true;
    default: return false;
    }
}

// Compute capability of the current device (the runtime API's device of this thread).
bool queryComputeCapability(int32_t& major, int32_t& minor) noexcept
{
    int device = 0;
    int ccMajor = 0;
    int ccMinor = 0;
    if (cudaGetDevice(&device) != cudaSuccess
        || cudaDeviceGetAttribute(&ccMajor, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess
        || cudaDeviceGetAttribute(&ccMinor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
    {
        (void) cudaGetLastError(); // do not leave the error for the next runtime call
        return false;
    }
    major = ccMajor;
    minor = ccMinor;
    return true;
}

CUdeviceptr devicePtr(void const* pointer) noexcept
{
    return static_cast<CUdeviceptr>(reinterpret_cast<std::uintptr_t>(pointer));
}

// Process-wide load state of each variant's module (Triton's generated globals are process-wide too).
std::mutex gLoadMutex;
std::array<CUcontext, kNbLaunchers> gLoadedContext{};

// Load the variant's cubin into the current context once. The generated loader exit()s on a CUDA error, so it
// is only called with a current context; a second context (another GPU) is refused instead of launching a
// function handle that belongs to the first.
bool ensureLoaded(int32_t index, std::string& error) noexcept
{
    CUcontext context{nullptr};
    if (cuCtxGetCurrent(&context) != CUDA_SUCCESS || context == nullptr)
    {
        error = "no current CUDA context on the enqueueing thread";
        return false;
    }
    std::lock_guard<std::mutex> lock(gLoadMutex);
    CUcontext& loaded = gLoadedContext[static_cast<std::size_t>(index)];
    if (loaded == nullptr)
    {
        kLaunchers[index].load();
        loaded = context;
        return true;
    }
    if (loaded != context)
    {
        error = std::string(kLaunchers[index].name)
            + " is already loaded in another CUDA context; the AOT launchers support one CUDA context per process";
        return false;
    }
    return true;
}

// ---- the plugin ------------------------------------------------------------------------------------------------
class JointAttentionPlugin final : public IPluginV3,
                                   public IPluginV3OneCore,
                                   public IPluginV3OneBuild,
                                   public IPluginV3OneRuntime
{
public:
    explicit JointAttentionPlugin(Params const& params)
        : mParams(params)
        , mMaskName(maskName(params.mask))
    {
        std::ostringstream metadata;
        metadata << "mask=" << mMaskName;
        mMetadata = metadata.str();
    }

    JointAttentionPlugin(JointAttentionPlugin const&) = delete;
    JointAttentionPlugin& operator=(JointAttentionPlugin const&) = delete;
    ~JointAttentionPlugin() override = default;

    // IPluginV3 -----------------------------------------------------------------------------------------------
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    IPluginV3* clone() noexcept override
    {
        try
        {
            auto* copy = new JointAttentionPlugin(mParams);
            copy->mSmMajor = mSmMajor;
            copy->mSmMinor = mSmMinor;
            copy->mSmQueried = mSmQueried;
            copy->mLauncher = mLauncher;
            return copy;
        }
        catch (std::exception const& e)
        {
            logError(std::string("clone failed: ") + e.what());
        }
        return nullptr;
    }

    // IPluginV3OneCore ----------------------------------------------------------------------------------------
    AsciiChar const* getPluginName() const noexcept override
    {
        return kPluginName;
    }

    AsciiChar const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }

    AsciiChar const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }

    // IPluginV3OneBuild ---------------------------------------------------------------------------------------
    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override
    {
        try
        {
            if (in == nullptr || out == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs)
            {
                logError("configurePlugin: expected 7 inputs and 1 output");
                return 1;
            }
            std::array<nvinfer1::Dims, kNbInputs> dims{};
            for (int32_t i = 0; i < kNbInputs; ++i)
            {
                dims[static_cast<std::size_t>(i)] = in[i].desc.dims;
            }
            std::string error;
            if (!checkInputShapes(dims.data(), kNbInputs, error))
            {
                logError("configurePlugin: " + error);
                return 1;
            }
            int64_t const headDim = in[kQ].desc.dims.d[3];
            if (headDim < 0)
            {
                logError("configurePlugin: the head dim (last axis of q) must be a build-time constant");
                return 1;
            }
            return selectLauncher(in[kQ].desc.type, headDim) ? 0 : 1;
        }
        catch (std::exception const& e)
        {
            logError(std::string("configurePlugin: ") + e.what());
        }
        return 1;
    }

    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (outputTypes == nullptr || inputTypes == nullptr || nbOutputs != kNbOutputs || nbInputs != kNbInputs)
        {
            return 1;
        }
        outputTypes[0] = inputTypes[kQ]; // out has q's dtype
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
        int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
        IExprBuilder& /*exprBuilder*/) noexcept override
    {
        if (inputs == nullptr || outputs == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs
            || inputs[kQ].nbDims != 4)
        {
            logError("getOutputShapes: expected 7 inputs with q of rank 4 [B, N, H, D] and 1 output");
            return 1;
        }
        outputs[0] = inputs[kQ]; // out has q's shape [B, N, H, D]
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept override
    {
        if (inOut == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0
            || pos >= kNbInputs + kNbOutputs)
        {
            return false;
        }
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        switch (pos)
        {
        case kQ:
        {
            // q's dtype is supported when a compiled variant of it can run here (fp32 only if it was compiled)
            Dtype dtype{};
            if (!toDtype(desc.type, dtype))
            {
                return false;
            }
            int64_t const headDim = desc.dims.nbDims == 4 ? desc.dims.d[3] : -1;
            ensureComputeCapability();
            if (!mSmQueried)
            {
                return dtypeAvailableAnyArch(dtype, headDim);
            }
            return dtypeAvailable(kLaunchers, kNbLaunchers, dtype, headDim, mParams.mask, mSmMajor, mSmMinor);
        }
        case kK:
        case kV:
        case kOut: return desc.type == inOut[kQ].desc.type;
        case kNVideo: return desc.type == DataType::kINT64; // int64 in the ONNX node and in the kernel signature
        default: return false;
        }
    }

    int32_t getNbOutputs() const noexcept override
    {
        return kNbOutputs;
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
        DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept override
    {
        return 0;
    }

    char const* getMetadataString() noexcept override
    {
        return mMetadata.c_str();
    }

    // IPluginV3OneRuntime -------------------------------------------------------------------------------------
    int32_t onShapeChange(
        PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept override
    {
        try
        {
            if (in == nullptr || out == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs)
            {
                logError("onShapeChange: expected 7 inputs and 1 output");
                return 1;
            }
            std::array<nvinfer1::Dims, kNbInputs> dims{};
            for (int32_t i = 0; i < kNbInputs; ++i)
            {
                dims[static_cast<std::size_t>(i)] = in[i].dims;
            }
            std::string error;
            nvinfer1::Dims const& q = in[kQ].dims;
            if (!checkInputShapes(dims.data(), kNbInputs, error)
                || !checkLaunchDims(q.d[0], q.d[1], q.d[2], q.d[3], error))
            {
                logError("onShapeChange: " + error);
                return 1;
            }
            return selectLauncher(in[kQ].type, q.d[3]) ? 0 : 1;
        }
        catch (std::exception const& e)
        {
            logError(std::string("onShapeChange: ") + e.what());
        }
        return 1;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
        void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept override
    {
        try
        {
            if (inputDesc == nullptr || inputs == nullptr || outputs == nullptr)
            {
                return 1;
            }
            nvinfer1::Dims const& q = inputDesc[kQ].dims;
            std::string error;
            if (q.nbDims != 4 || !checkLaunchDims(q.d[0], q.d[1], q.d[2], q.d[3], error))
            {
                logError("enqueue: " + error);
                return 1;
            }
            if (q.d[0] == 0 || q.d[1] == 0 || q.d[2] == 0)
            {
                return 0; // empty output; the generated launcher must not be called with an empty grid
            }
            if (mLauncher < 0 && !selectLauncher(inputDesc[kQ].type, q.d[3]))
            {
                return 1;
            }
            if (!ensureLoaded(mLauncher, error))
            {
                logError("enqueue: " + error);
                return 1;
            }
            Launcher const& launcher = kLaunchers[mLauncher];
            CUresult const result = launcher.launch(static_cast<CUstream>(stream), devicePtr(inputs[kQ]),
                devicePtr(inputs[kK]), devicePtr(inputs[kV]), devicePtr(inputs[kNVideo]), static_cast<int32_t>(q.d[1]),
                static_cast<int32_t>(q.d[2]), static_cast<int32_t>(q.d[0]), devicePtr(outputs[0]), 0);
            if (result != CUDA_SUCCESS)
            {
                char const* name{nullptr};
                (void) cuGetErrorName(result, &name);
                logError(std::string("enqueue: ") + launcher.name + " failed with " + (name ? name : "?")
                    + (result == CUDA_ERROR_INVALID_VALUE ? " (every tensor must be 16-byte aligned)" : ""));
                return 1;
            }
            return 0;
        }
        catch (std::exception const& e)
        {
            logError(std::string("enqueue: ") + e.what());
        }
        return 1;
    }

    IPluginV3* attachToContext(IPluginResourceContext* /*context*/) noexcept override
    {
        return clone(); // no per-context resources
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        // read back by JointAttentionCreator::createPlugin(..., TensorRTPhase::kRUNTIME) through parseFields
        mSerialFields[0] = PluginField("mask", mMaskName.c_str(), PluginFieldType::kCHAR,
            static_cast<int32_t>(mMaskName.size() + 1));
        mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
        mSerialCollection.fields = mSerialFields.data();
        return &mSerialCollection;
    }

private:
    void ensureComputeCapability() noexcept
    {
        if (!mSmQueried)
        {
            mSmQueried = queryComputeCapability(mSmMajor, mSmMinor);
        }
    }

    bool dtypeAvailableAnyArch(Dtype dtype, int64_t headDim) const noexcept
    {
        for (std::size_t i = 0; i < kNbLaunchers; ++i)
        {
            Launcher const& l = kLaunchers[i];
            if (l.dtype == dtype && l.mask == mParams.mask && (headDim < 0 || l.head_dim == headDim))
            {
                return true;
            }
        }
        return false;
    }

    // Choose the launcher for (q dtype, head dim, mask, this device); logs why when there is none.
    bool selectLauncher(DataType type, int64_t headDim) noexcept
    {
        Dtype dtype{};
        if (!toDtype(type, dtype))
        {
            logError("q/k/v must be fp16, bf16 or fp32");
            return false;
        }
        ensureComputeCapability();
        if (!mSmQueried)
        {
            logError("could not query the compute capability of the current CUDA device");
            return false;
        }
        mLauncher = selectVariant(kLaunchers, kNbLaunchers, dtype, headDim, mParams.mask, mSmMajor, mSmMinor);
        if (mLauncher < 0)
        {
            logError(std::string("no AOT kernel for ") + dtypeName(dtype) + " head_dim " + std::to_string(headDim)
                + " mask " + maskName(mParams.mask) + " on sm_" + std::to_string(mSmMajor) + std::to_string(mSmMinor)
                + "; this library was built with: " + describeVariants(kLaunchers, kNbLaunchers)
                + " (rebuild with -DMVGEN_AOT_ARCHS/DTYPES/HEAD_DIMS/MASKS)");
            return false;
        }
        return true;
    }

    Params mParams;
    std::string mMaskName;
    std::string mMetadata;
    int32_t mSmMajor{-1};
    int32_t mSmMinor{-1};
    bool mSmQueried{false};
    int32_t mLauncher{-1};
    std::array<PluginField, 1> mSerialFields{};
    PluginFieldCollection mSerialCollection{};
};

// ---- the creator -----------------------------------------------------------------------------------------------
class JointAttentionCreator final : public IPluginCreatorV3One
{
public:
    JointAttentionCreator()
    {
        // the attributes of the ONNX node (export/plugin.py); plugin_namespace is how the parser finds us
        mFields[0] = PluginField("mask", nullptr, PluginFieldType::kCHAR, 0);
        mFields[1] = PluginField("plugin_namespace", nullptr, PluginFieldType::kCHAR, 0);
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
    }

    AsciiChar const* getPluginName() const noexcept override
    {
        return kPluginName;
    }

    AsciiChar const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }

    AsciiChar const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }

    PluginFieldCollection const* getFieldNames() noexcept override
    {
        return &mCollection;
    }

    IPluginV3* createPlugin(
        AsciiChar const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept override
    {
        try
        {
            Params params;
            std::string error;
            if (fc == nullptr)
            {
                error = "no plugin fields";
            }
            if (fc == nullptr || !parseFields(fc->fields, fc->nbFields, params, error))
            {
                logError(std::string("createPlugin(") + (name ? name : "") + ", "
                    + (phase == TensorRTPhase::kBUILD ? "build" : "runtime") + "): " + error);
                return nullptr;
            }
            return new JointAttentionPlugin(params);
        }
        catch (std::exception const& e)
        {
            logError(std::string("createPlugin: ") + e.what());
        }
        return nullptr;
    }

private:
    std::array<PluginField, 2> mFields{};
    PluginFieldCollection mCollection{};
};

JointAttentionCreator& creator()
{
    static JointAttentionCreator instance;
    return instance;
}

#if MVGEN_TRT_STATIC_REGISTRATION
// Registration when the library is loaded (the job of REGISTER_TENSORRT_PLUGIN, done here so that the namespace is
// passed explicitly and a failure is reported). Like nvinfer1::PluginRegistrar it does not deregister: the library
// must stay loaded while TensorRT may use the creator (tritonserver and ctypes never unload it).
struct StaticRegistration
{
    StaticRegistration()
    {
        nvinfer1::IPluginRegistry* registry = getPluginRegistry();
        if (registry == nullptr || !registry->registerCreator(creator(), kPluginNamespace))
        {
            logError("could not register mvgen::JointAttention with TensorRT's plugin registry (already registered, "
                     "e.g. by the Python quickly-deployable plugin or a second copy of this library?)");
        }
    }
};
StaticRegistration const gStaticRegistration;
#endif

} // namespace
} // namespace ja
} // namespace mvgen

// ---- C entry points ------------------------------------------------------------------------------------------
extern "C"
{
// Called by IPluginRegistry::loadLibrary before getCreators: gives the plugin TensorRT's logger.
TENSORRTAPI void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    mvgen::ja::setLoggerFinderImpl(finder);
}

#if !MVGEN_TRT_STATIC_REGISTRATION
// IPluginRegistry::loadLibrary (trtexec --dynamicPlugins) registers the creators this returns and owns their
// registration (deregisterLibrary). Only IPluginV3 creators here, so no getPluginCreators (IPluginCreator list).
TENSORRTAPI nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&mvgen::ja::creator()};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}
#endif
} // extern "C"
