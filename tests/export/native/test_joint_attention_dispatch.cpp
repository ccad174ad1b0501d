// The TensorRT-independent logic of the mvgen::JointAttention plugin (native/joint_attention_dispatch.h), and,
// with -DMVGEN_TEST_LAUNCHERS, the launcher table the plugin builds from a real CMake build tree
// (native/joint_attention_launchers.h over <build>/aot). Compiled and run by tests/export/test_cmake.py.
#include "joint_attention_dispatch.h"

#ifdef MVGEN_TEST_LAUNCHERS
#include "joint_attention_launchers.h"
#endif

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace ja = mvgen::ja;

static int gFailures = 0;

#define CHECK(cond)                                                                                              \
    do                                                                                                           \
    {                                                                                                            \
        if (!(cond))                                                                                             \
        {                                                                                                        \
            std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);                                          \
            ++gFailures;                                                                                         \
        }                                                                                                        \
    } while (0)

// Stand-ins with the member names of nvinfer1::PluginField / nvinfer1::Dims (what the templates read).
struct Field
{
    char const* name;
    void const* data;
    int32_t type;
    int32_t length;
};

struct Dims
{
    int32_t nbDims;
    int64_t d[8];
};

struct Variant
{
    ja::Dtype dtype;
    int32_t head_dim;
    ja::Mask mask;
    int32_t arch;
};

static Field str(char const* name, char const* text, bool withNul)
{
    return Field{name, text, ja::field_type::kCHAR, static_cast<int32_t>(std::strlen(text) + (withNul ? 1 : 0))};
}

static void testParseFields()
{
    float const one = 1.0F;
    std::string error;

    // what TensorRT's ONNX parser hands over for the exported node (both attributes)
    {
        char const isolated[] = {'i', 's', 'o', 'l', 'a', 't', 'e', 'd'}; // not NUL-terminated
        std::vector<Field> fields = {
            Field{"mask", isolated, ja::field_type::kCHAR, 8},
            str("plugin_namespace", "mvgen", false),
        };
        ja::Params params;
        CHECK(ja::parseFields(fields.data(), static_cast<int32_t>(fields.size()), params, error));
        CHECK(params.mask == ja::Mask::kIsolated);
    }
    // what getFieldsToSerialize writes (NUL counted in the length)
    {
        std::vector<Field> fields = {str("mask", "full", true)};
        ja::Params params;
        params.mask = ja::Mask::kIsolated;
        CHECK(ja::parseFields(fields.data(), 1, params, error));
        CHECK(params.mask == ja::Mask::kFull);
    }
    // errors leave params untouched and say why; version 1's RoPE attributes are refused (the node changed)
    struct Bad
    {
        std::vector<Field> fields;
        char const* expect;
    };
    std::vector<Bad> bad = {
        {{}, "missing plugin field 'mask'"},
        {{str("mask", "prototype", true)}, "mask must be"},
        {{str("mask", "full", true), str("plugin_namespace", "other", true)}, "plugin_namespace must be"},
        {{str("mask", "full", true), str("plugin_version", "1", true)}, "plugin_version must be"},
        {{Field{"mask", &one, ja::field_type::kFLOAT32, 1}}, "must be a string"},
        {{str("mask", "full", true), Field{"theta", &one, ja::field_type::kFLOAT32, 1}}, "unknown plugin field 'theta'"},
        {{str("mask", "full", true), str("causal", "1", true)}, "unknown plugin field 'causal'"},
    };
    for (Bad const& b : bad)
    {
        ja::Params params;
        params.mask = ja::Mask::kIsolated;
        error.clear();
        CHECK(!ja::parseFields(b.fields.data(), static_cast<int32_t>(b.fields.size()), params, error));
        CHECK(error.find(b.expect) != std::string::npos);
        CHECK(params.mask == ja::Mask::kIsolated);
    }
}

static std::vector<Dims> shapes(int64_t b, int64_t n, int64_t h, int64_t d)
{
    return {Dims{4, {b, n, h, d}}, Dims{4, {b, n, h, d}}, Dims{4, {b, n, h, d}}, Dims{1, {1}}};
}

static void testShapes()
{
    std::string error;
    auto ok = shapes(2, 300, 12, 128);
    CHECK(ja::checkInputShapes(ok.data(), 4, error));
    auto dynamic = shapes(-1, -1, 12, 128); // build-time wildcards pass
    CHECK(ja::checkInputShapes(dynamic.data(), 4, error));
    CHECK(!ja::checkInputShapes(ok.data(), 7, error) && error.find("4 inputs") != std::string::npos);

    auto badK = ok;
    badK[ja::kK].d[2] = 6;
    CHECK(!ja::checkInputShapes(badK.data(), 4, error) && error.find("k must") != std::string::npos);
    auto badV = ok;
    badV[ja::kV].d[1] = 299;
    CHECK(!ja::checkInputShapes(badV.data(), 4, error) && error.find("v must") != std::string::npos);
    auto badRank = ok;
    badRank[ja::kNVideo] = Dims{0, {}};
    CHECK(!ja::checkInputShapes(badRank.data(), 4, error));
    CHECK(error.find("n_video must have rank 1") != std::string::npos);
    auto badVideo = ok;
    badVideo[ja::kNVideo].d[0] = 2;
    CHECK(!ja::checkInputShapes(badVideo.data(), 4, error) && error.find("n_video must be [1]") != std::string::npos);

    CHECK(ja::checkLaunchDims(2, 32760 + 3 * 1560, 40, 128, error)); // Wan 14B, 480p x 81 frames + 3 refs
    CHECK(!ja::checkLaunchDims(1, 1 << 20, 40, 128, error) && error.find("int32") != std::string::npos);
    CHECK(!ja::checkLaunchDims(2048, 16, 40, 64, error) && error.find("65535") != std::string::npos);
}

static void testSelect()
{
    Variant const table[] = {
        {ja::Dtype::kFP16, 128, ja::Mask::kFull, 90},
        {ja::Dtype::kFP16, 128, ja::Mask::kFull, 80},
        {ja::Dtype::kBF16, 128, ja::Mask::kFull, 80},
        {ja::Dtype::kFP16, 64, ja::Mask::kIsolated, 80},
        {ja::Dtype::kFP16, 128, ja::Mask::kFull, 86},
    };
    std::size_t const n = sizeof(table) / sizeof(table[0]);
    auto select = [&](ja::Dtype dt, int64_t d, ja::Mask m, int32_t major, int32_t minor) {
        int32_t i = ja::selectVariant(table, n, dt, d, m, major, minor);
        return i < 0 ? -1 : table[i].arch;
    };
    CHECK(select(ja::Dtype::kFP16, 128, ja::Mask::kFull, 9, 0) == 90);  // H100 / H200
    CHECK(select(ja::Dtype::kFP16, 128, ja::Mask::kFull, 8, 0) == 80);  // A100
    CHECK(select(ja::Dtype::kFP16, 128, ja::Mask::kFull, 8, 9) == 86);  // L40S: highest same-major arch <= 8.9
    CHECK(select(ja::Dtype::kFP16, 128, ja::Mask::kFull, 8, 6) == 86);
    CHECK(select(ja::Dtype::kFP16, 128, ja::Mask::kFull, 8, 5) == 80);  // an sm_86 cubin needs minor >= 6
    CHECK(select(ja::Dtype::kBF16, 128, ja::Mask::kFull, 8, 9) == 80);
    CHECK(select(ja::Dtype::kBF16, 128, ja::Mask::kFull, 9, 0) == -1);  // sm_80 cubins do not run on sm_90
    CHECK(select(ja::Dtype::kFP16, 128, ja::Mask::kFull, 10, 0) == -1); // nor sm_90 ones on Blackwell
    CHECK(select(ja::Dtype::kFP16, 128, ja::Mask::kFull, 7, 5) == -1);
    CHECK(select(ja::Dtype::kFP16, 128, ja::Mask::kIsolated, 9, 0) == -1);
    CHECK(select(ja::Dtype::kFP16, 64, ja::Mask::kIsolated, 8, 0) == 80);
    CHECK(select(ja::Dtype::kFP32, 128, ja::Mask::kFull, 9, 0) == -1);

    CHECK(ja::dtypeAvailable(table, n, ja::Dtype::kFP16, -1, ja::Mask::kIsolated, 8, 6));
    CHECK(!ja::dtypeAvailable(table, n, ja::Dtype::kFP16, -1, ja::Mask::kIsolated, 9, 0));
    CHECK(!ja::dtypeAvailable(table, n, ja::Dtype::kBF16, 128, ja::Mask::kFull, 9, 0));
    CHECK(ja::describeVariants(table, 2) == "fp16 d128 full sm90, fp16 d128 full sm80");
    CHECK(ja::describeVariants(table, 0) == "none");
}

#ifdef MVGEN_TEST_LAUNCHERS
// The build tree of tests/export/test_cmake.py compiles fp16 / head dim 128 / full for sm_90 and sm_80.
static void testLaunchers()
{
    CHECK(ja::kNbLaunchers == 2);
    CHECK(std::strcmp(ja::kLaunchers[0].name, "mvgen_ja_fp16_d128_full_sm90") == 0);
    CHECK(std::strcmp(ja::kLaunchers[1].name, "mvgen_ja_fp16_d128_full_sm80") == 0);
    for (std::size_t i = 0; i < ja::kNbLaunchers; ++i)
    {
        CHECK(ja::kLaunchers[i].launch != nullptr && ja::kLaunchers[i].load != nullptr);
        CHECK(ja::kLaunchers[i].dtype == ja::Dtype::kFP16 && ja::kLaunchers[i].head_dim == 128);
    }
    CHECK(ja::kLaunchers[0].launch != ja::kLaunchers[1].launch);
    // resolved against libmvgen_triton_kernels.so when linked: the addresses are its exported entry points
    CHECK(ja::kLaunchers[0].launch == &mvgen_ja_fp16_d128_full_sm90);
    CHECK(ja::kLaunchers[1].load == &load_mvgen_ja_fp16_d128_full_sm80);
    CHECK(ja::selectVariant(ja::kLaunchers, ja::kNbLaunchers, ja::Dtype::kFP16, 128, ja::Mask::kFull, 9, 0) == 0);
    CHECK(ja::selectVariant(ja::kLaunchers, ja::kNbLaunchers, ja::Dtype::kFP16, 128, ja::Mask::kFull, 8, 9) == 1);
    CHECK(ja::selectVariant(ja::kLaunchers, ja::kNbLaunchers, ja::Dtype::kBF16, 128, ja::Mask::kFull, 9, 0) == -1);
}
#endif

int main()
{
    testParseFields();
    testShapes();
    testSelect();
#ifdef MVGEN_TEST_LAUNCHERS
    testLaunchers();
#endif
    if (gFailures != 0)
    {
        std::printf("%d check(s) failed\n", gFailures);
        return 1;
    }
    std::printf("ok\n");
    return 0;
}
