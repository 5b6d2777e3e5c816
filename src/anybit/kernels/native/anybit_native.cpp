// anybit's native CPU kernels: one C ABI (loaded with ctypes, so that no build ties it to a
// torch version), three instruction sets chosen at run time (AVX-512, AVX2, portable C++).
// The kernels themselves are in kernels_impl.inc, compiled once per instruction set.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
// GCC 12 warns of uninitialized values inside its own AVX-512 headers (the _mm512_undefined_*
// placeholders of intrinsics such as _mm512_broadcast_i32x4; GCC bug 105593): ~1000 false
// warnings per build that would hide a real one. Other compilers keep the warnings.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

// BCQ: int8 tables looked up four chunks at a time by vpermb and summed by vpdpbusd (2, where
// the CPU has AVX-512 VBMI and VNNI and the groups are whole quads of chunks; else 1), with
// vpshufb (1), or the float tables with gathers or in-register permutes (0)
static int g_bcq_int8 = 2;

// Set on each thread of the native decoding step's thread team (anybit_decode_layers): a
// kernel called there shares its loop over rows with that team (its `omp for` binds to the
// enclosing region) instead of starting a team of its own, so that a token costs one fork
// and join instead of one per linear, and the small operators between the linears are
// split over the same threads.
static thread_local bool t_team = false;

// body() on a team of nthreads threads, or (inside the decoding team) on the calling team:
// every thread runs body, whose `omp for` loops divide their iterations among the team.
template <class F>
static void run_team(int nthreads, const F& body) {
    if (t_team) {
        body();
        return;
    }
#pragma omp parallel num_threads(nthreads)
    body();
}

// f(i) for i in [0, n) as a work-sharing loop of the enclosing team, or all of it on every
// thread of the decoding team (work whose result each thread keeps for itself: the
// quantized activations of one token).
template <class F>
static inline void each_private(int64_t n, const F& f) {
    if (t_team) {
        for (int64_t i = 0; i < n; ++i) f(i);
        return;
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) f(i);
}

namespace isa_scalar {
#define ANYBIT_ISA 0
#include "kernels_impl.inc"
#undef ANYBIT_ISA
}  // namespace isa_scalar

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
namespace isa_avx2 {
#define ANYBIT_ISA 1
#include "kernels_impl.inc"
#undef ANYBIT_ISA
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vpopcntdq,avx2,fma,f16c,bmi,bmi2,popcnt")
namespace isa_avx512 {
#define ANYBIT_ISA 2
#include "kernels_impl.inc"
#undef ANYBIT_ISA
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vnni,avx2,fma,f16c,bmi,bmi2,popcnt")
// (GCC 12 warns "‘__Y’ may be used uninitialized" inside its own intrinsics' _mm512_undefined_*
// once these are inlined into the unrolled tiles: a known false positive, GCC bug 105593)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace isa_bcq_vnni {
#include "kernels_bcq_vnni.inc"
}  // namespace isa_bcq_vnni
#pragma GCC diagnostic pop
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi,bmi2,popcnt")
namespace isa_vnni {
#define Q8_ISA 2
#include "kernels_q8.inc"
#undef Q8_ISA
}  // namespace isa_vnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
namespace isa_q8avx2 {
#define Q8_ISA 1
#include "kernels_q8.inc"
#undef Q8_ISA
}  // namespace isa_q8avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,bmi,bmi2,popcnt")
namespace isa_q8vnni256 {
#define Q8_ISA 1
#define Q8_VNNI 1
#include "kernels_q8.inc"
#undef Q8_ISA
}  // namespace isa_q8vnni256
#pragma GCC pop_options

// The two VNNI kernels again with GFNI (Q8_GFNI: pieces moved into place by gf2p8affineqb),
// chosen where the CPU has it (AVX-512 VNNI without GFNI: Cascade Lake)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,gfni,avx2,fma,f16c,bmi,bmi2,popcnt")
namespace isa_vnni_gfni {
#define Q8_ISA 2
#define Q8_GFNI 1
#include "kernels_q8.inc"
#undef Q8_ISA
}  // namespace isa_vnni_gfni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,gfni,avx2,fma,f16c,bmi,bmi2,popcnt")
namespace isa_q8vnni256_gfni {
#define Q8_ISA 1
#define Q8_VNNI 1
#define Q8_GFNI 1
#include "kernels_q8.inc"
#undef Q8_ISA
}  // namespace isa_q8vnni256_gfni
#pragma GCC pop_options

namespace dec_portable {
static constexpr int kLanes = 4;  // float lanes of a vector register
#include "kernels_decode.inc"
}  // namespace dec_portable

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace dec_avx512 {
static constexpr int kLanes = 16;  // float lanes of a vector register
#include "kernels_decode.inc"
}  // namespace dec_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace dec_avx2 {
static constexpr int kLanes = 8;  // float lanes of a vector register
#include "kernels_decode.inc"
}  // namespace dec_avx2
#pragma GCC pop_options

namespace train_portable {
#include "kernels_train.inc"
}  // namespace train_portable

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace train_avx512 {
#include "kernels_train.inc"
}  // namespace train_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace train_avx2 {
#include "kernels_train.inc"
}  // namespace train_avx2
#pragma GCC pop_options

static int g_isa = -1;

extern "C" {

// 2: AVX-512 (F, BW, VL, DQ, VBMI, VPOPCNTDQ); 1: AVX2 + FMA; 0: portable
int anybit_cpu_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vbmi") &&
        __builtin_cpu_supports("avx512vpopcntdq"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
        __builtin_cpu_supports("popcnt"))
        return 1;
    return 0;
}

// set the instruction set (capped at what the CPU has); returns the one in use
int anybit_set_isa(int isa) {
    int best = anybit_cpu_isa();
    g_isa = std::max(0, std::min(isa, best));
    return g_isa;
}

int anybit_get_isa(void) {
    if (g_isa < 0) g_isa = anybit_cpu_isa();
    return g_isa;
}

#define DISPATCH(call)                                   \
    switch (anybit_get_isa()) {                          \
        case 2: isa_avx512::call; break;                 \
        case 1: isa_avx2::call; break;                   \
        default: isa_scalar::call; break;                \
    }

void anybit_int_gemm(const float* x, int64_t M, int64_t K, const uint8_t* qweight, int64_t row_bytes, int64_t N,
                     int bits, int64_t gsize, int64_t G, const float* scales, const float* szs, const float* bias,
                     float* y, int nthreads) {
    DISPATCH(weight_only_gemm<0>(x, M, K, qweight, row_bytes, N, bits, 0, gsize, G, scales, szs, bias, y, nthreads))
}

// lut: 1 = exponent add once per group into a 16-entry register table (AVX-512), 0 = per weight
// zero: exponent code 0 is the level 0 (``potz``; scales passed halved)
void anybit_pot_gemm(const float* x, int64_t M, int64_t K, const uint8_t* qweight, int64_t row_bytes, int64_t N,
                     int bits, int zero, int64_t gsize, int64_t G, const float* scales, const float* bias, float* y,
                     int nthreads, int lut) {
    if (lut) {
        DISPATCH(weight_only_gemm<2>(x, M, K, qweight, row_bytes, N, bits, zero, gsize, G, scales, nullptr, bias, y, nthreads))
    } else {
        DISPATCH(weight_only_gemm<1>(x, M, K, qweight, row_bytes, N, bits, zero, gsize, G, scales, nullptr, bias, y, nthreads))
    }
}

// 1 if the CPU has AVX-512 VNNI (used where the instruction set in use is AVX-512)
int anybit_cpu_vnni(void) {
    __builtin_cpu_init();
    return anybit_cpu_isa() == 2 && __builtin_cpu_supports("avx512vnni");
}

static bool use_vnni(void) { return anybit_get_isa() == 2 && anybit_cpu_vnni(); }

// Where VNNI is in use: 1 = the AVX2 kernel and layout with 256-bit vpdpbusd (Q8_VNNI in
// kernels_q8.inc), 0 = the 512-bit tile (anybit_set_q8_vnni256; native.py picks the default)
static int g_q8_vnni256 = 0;

int anybit_set_q8_vnni256(int on) {
    const int old = g_q8_vnni256;
    g_q8_vnni256 = on ? 1 : 0;
    return old;
}

// Where VNNI is in use and the 256-bit kernel is not chosen: 1 = the rows-in-lanes kernel and layout
// (kernels_q8_rows16.inc, the default), 0 = the 4-row 512-bit tile (anybit_set_q8_rows16; for comparisons)
static int g_q8_rows16 = 1;

int anybit_set_q8_rows16(int on) {
    const int old = g_q8_rows16;
    g_q8_rows16 = on ? 1 : 0;
    return old;
}

// The version of the rows-in-lanes layout (kernels_q8_rows16.inc), which native.py reads to build
// it: 2 = 1-bit pieces in 64-byte lines of 8 chunks, a group's narrowest piece first, float16
// scales and uint8 zero points (bit-plane: and the int32 U − cnt·a per group); 3 = as 2, but the
// bit-plane U term only where activations have a zero point per weight group (per token: one
// float32 per row; symmetric per group: none). Builds without the function (1): 64-bit masks in the
// pieces' order, float32 scales and s·z (benchmarks/ab_native.py loads such builds)
int anybit_q8_rl_layout(void) { return 3; }

// Where VNNI is in use and the CPU has GFNI: 1 = the kernels compiled with it (Q8_GFNI), 0 = without
// (anybit_set_q8_gfni; for comparisons and tests)
static int g_q8_gfni = 1;

int anybit_cpu_gfni(void) {  // the GFNI generation, which has VBMI too (Ice Lake, Zen 4): both asked
    __builtin_cpu_init();
    return __builtin_cpu_supports("gfni") && __builtin_cpu_supports("avx512vbmi");
}

int anybit_set_q8_gfni(int on) {
    const int old = g_q8_gfni;
    g_q8_gfni = on ? 1 : 0;
    return old;
}

static bool use_gfni(void) {
    static const bool cpu = anybit_cpu_gfni();  // asked once: this runs on every call of the kernels
    return g_q8_gfni && cpu && use_vnni();
}

// 1 if the int8 kernels in use move pieces with GFNI
int anybit_q8_gfni(void) { return use_gfni() ? 1 : 0; }

// Which int8-activation kernel runs: 4 AVX-512 VNNI with rows in the lanes, 3 AVX2 layout with
// 256-bit VNNI, 2 AVX-512 VNNI 4-row tile, 1 AVX2 (vpmaddubsw), 0 none (the portable instruction set)
int anybit_has_q8(void) {
    if (use_vnni()) return g_q8_vnni256 ? 3 : g_q8_rows16 ? 4 : 2;
    return anybit_get_isa() >= 1 ? 1 : 0;
}

// INT weights in the piece layout of kernels_q8.inc against int8-quantized activations;
// B: activation block (a multiple of 64 dividing the group, or 128 per channel)
// table: nullptr for INT codes, else 32 bytes: 16 mapping each (PoT) code to level + Z, then,
// where the levels do not fit a byte (plain PoT W4: ±128, native.pot_halves), 16 more whose
// levels add to the first's (all zero when unused; two: it is used); szs is then s·(Z + Z2). The
// 512-bit tile dots both tables in one pass over the codes; the other kernels run one pass per table.
static void q8_gemm(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t N, int bits,
                    int64_t gsize, int64_t G, int64_t B, const float* scales, const float* szs, const float* bias,
                    float* y, int nthreads, const uint8_t* table, bool two) {
// FN: gemm (the 4-row tiles) or gemm_rows16 (kernels_q8_rows16.inc), same arguments
#define Q8(NS, FN, BITS, TWO)                                                                                        \
    case BITS:                                                                                                       \
        if (table)                                                                                                   \
            NS::q8::FN<BITS, true, TWO>(x, M, K, w, row_bytes, N, gsize, G, B, scales, szs, bias, y, nthreads, table);   \
        else                                                                                                         \
            NS::q8::FN<BITS, false>(x, M, K, w, row_bytes, N, gsize, G, B, scales, szs, bias, y, nthreads, table);    \
        break;
#define Q8_BITS(NS, FN)                                                                                          \
    switch (bits) {                                                                                              \
        Q8(NS, FN, 2, false) Q8(NS, FN, 3, false) Q8(NS, FN, 4, false) Q8(NS, FN, 5, false) Q8(NS, FN, 6, false) \
        Q8(NS, FN, 7, false) Q8(NS, FN, 8, false)                                                                \
        default: break;                                                                                          \
    }
#define Q8_TWO(NS, FN)                                                                                          \
    switch (bits) {                                                                                             \
        Q8(NS, FN, 4, true)                                                                                     \
        default: break;                                                                                         \
    }
// the 512-bit kernels: both tables in one pass where there are two
#define Q8_512(FN)                                                                                              \
    if (two) {                                                                                                  \
        if (gfni) Q8_TWO(isa_vnni_gfni, FN) else Q8_TWO(isa_vnni, FN)                                           \
    } else {                                                                                                    \
        if (gfni) Q8_BITS(isa_vnni_gfni, FN) else Q8_BITS(isa_vnni, FN)                                         \
    }
    const int kind = anybit_has_q8();
    const bool gfni = use_gfni();
    if ((kind == 4 || kind == 2) && B % 64 == 0 && (!two || bits == 4)) {  // blocks of 32: the AVX2 layout's kernel (below)
        if (kind == 4) {
            Q8_512(gemm_rows16)  // rows in the lanes (kernels_q8_rows16.inc)
        } else {
            Q8_512(gemm)  // the 4-row tile
        }
    } else if (two) {  // one pass per table, added: the zero-point terms (szs) and the bias with the first
        std::vector<float> y2(M * N), none(N * G, 0.0f);
        q8_gemm(x, M, K, w, row_bytes, N, bits, gsize, G, B, scales, szs, bias, y, nthreads, table, false);
        q8_gemm(x, M, K, w, row_bytes, N, bits, gsize, G, B, scales, none.data(), nullptr, y2.data(), nthreads,
                table + 16, false);
        // each block of rows added by the thread that computed it: the kernels' row loop is an
        // omp for schedule(static) over the same blocks, and OpenMP gives two such loops of a team
        // the same iterations per thread. Inside a decoding team y2 is each thread's own and holds
        // its rows only (every thread adding every row raced on the other thread's rows).
        constexpr int64_t R = isa_q8avx2::q8::R;  // rows per block of every kernel this fallback runs
        const int64_t nblk = (N + R - 1) / R;
        run_team(nthreads, [&] {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < nblk; ++t)
                for (int64_t m = 0; m < M; ++m)
                    for (int64_t n = R * t; n < std::min(N, R * t + R); ++n) y[m * N + n] += y2[m * N + n];
        });
    } else if (kind >= 2) {
        if (gfni) Q8_BITS(isa_q8vnni256_gfni, gemm) else Q8_BITS(isa_q8vnni256, gemm)
    } else if (anybit_get_isa() >= 1) {
        Q8_BITS(isa_q8avx2, gemm)
    }
#undef Q8_512
#undef Q8_TWO
#undef Q8_BITS
#undef Q8
}

void anybit_int_q8_gemm(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t N,
                        int bits, int64_t gsize, int64_t G, int64_t B, const float* scales, const float* szs,
                        const float* bias, float* y, int nthreads, const uint8_t* table) {
    bool two = false;  // a second table (pot_halves)
    if (table)
        for (int i = 16; i < 32; ++i) two |= table[i] != 0;
    q8_gemm(x, M, K, w, row_bytes, N, bits, gsize, G, B, scales, szs, bias, y, nthreads, table, two);
}

// Bit-plane WxAy as integer dot products over unsigned weight codes. rows = 4: the piece layout
// of kernels_q8.inc (bitplane_gemm, its AVX2 layout; AVX2 or better, with 256-bit vpdpbusd where
// AVX-512 VNNI is in use); aw: the zero point of u per (row, group), U: Σ u per (row, group).
// rows = 16 (where AVX-512 VNNI is in use): the rows-in-lanes layout (bitplane_rows16 of
// kernels_q8_rows16.inc), with sw, aw and U holding its per-block values scales, szs and wz.
void anybit_bitplane_q8_gemm(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes, int rows,
                             int64_t N, int bits, int64_t gsize, int64_t G, const float* sw, const float* aw,
                             const float* U, int abits, int asym, int64_t agroup, const float* bias, float* y,
                             int nthreads) {
    if (anybit_get_isa() < 1 || (rows == 16 && !use_vnni())) return;
#define BP(NS, FN, BITS) \
    case BITS: NS::q8::FN<BITS>(x, M, K, w, row_bytes, N, gsize, G, sw, aw, U, abits, asym, agroup, bias, y, nthreads); break;
#define BP_BITS(NS, FN)                                                                                         \
    switch (bits) {                                                                                             \
        BP(NS, FN, 2) BP(NS, FN, 3) BP(NS, FN, 4) BP(NS, FN, 5) BP(NS, FN, 6) BP(NS, FN, 7) BP(NS, FN, 8)       \
        default: break;                                                                                         \
    }
    if (rows == 16) {
        if (use_gfni()) BP_BITS(isa_vnni_gfni, bitplane_rows16) else BP_BITS(isa_vnni, bitplane_rows16)
    } else if (use_gfni()) {  // the 256-bit VNNI kernel in the AVX2 layout
        BP_BITS(isa_q8vnni256_gfni, bitplane_gemm)
    } else if (use_vnni()) {
        BP_BITS(isa_q8vnni256, bitplane_gemm)
    } else {
        BP_BITS(isa_q8avx2, bitplane_gemm)
    }
#undef BP_BITS
#undef BP
}

void anybit_dequant(int kind, const uint8_t* qweight, int64_t row_bytes, int64_t N, int64_t K, int bits, int zero,
                    int64_t gsize, int64_t G, const float* scales, const float* szs, float* out, int scratch_only,
                    int nthreads, float* checksum) {
    // kind: 0 INT ((q − z)·s), 1 PoT (exponent add per weight), 2 PoT (exponent-add table per group)
    if (kind == 0) {
        DISPATCH(dequant_rows<0>(qweight, row_bytes, N, K, bits, zero, gsize, G, scales, szs, out, scratch_only, nthreads, checksum))
    } else if (kind == 1) {
        DISPATCH(dequant_rows<1>(qweight, row_bytes, N, K, bits, zero, gsize, G, scales, szs, out, scratch_only, nthreads, checksum))
    } else {
        DISPATCH(dequant_rows<2>(qweight, row_bytes, N, K, bits, zero, gsize, G, scales, szs, out, scratch_only, nthreads, checksum))
    }
}

// BCQ weights to float32 (kernels_impl.inc, bcq_dequant)
void anybit_bcq_dequant(const uint8_t* planes, int64_t row_bytes, int64_t N, int64_t K, int q, int64_t gsize,
                        int64_t G, const float* alpha, const float* offset, float* out, int nthreads) {
    DISPATCH(bcq_dequant(planes, row_bytes, N, K, q, gsize, G, alpha, offset, out, nthreads))
}

// 0, 1 or 2 (g_bcq_int8); returns the mode set
int anybit_set_bcq_int8(int mode) {
    g_bcq_int8 = std::max(0, std::min(mode, 2));
    return g_bcq_int8;
}

// The version of the LUT-GEMM's coefficient layout (native._prep_bcq): 2 = α as float16 (what
// the format stores, so exact; half the bytes of version 1's float32 α: 9-14 % of a 2-3-bit
// layer's traffic at g64-g128), the offset float32 in both.
int anybit_bcq_layout(void) { return 2; }

void anybit_bcq_gemm(const float* x, int64_t M, int64_t K, const uint8_t* planesT, int64_t Npad, int64_t N, int q,
                     int64_t gsize, int64_t G, const uint16_t* alphaT, const float* offsetT, const float* bias, float* y,
                     int nthreads) {
    if (g_bcq_int8 == 2 && use_vnni() && isa_bcq_vnni::bcq_gemm_vnni_ok(q, gsize, G)) {
        isa_bcq_vnni::bcq_gemm_vnni(x, M, K, planesT, Npad, N, q, gsize, G, alphaT, offsetT, bias, y, nthreads);
        return;
    }
    DISPATCH(bcq_gemm(x, M, K, planesT, Npad, N, q, gsize, G, alphaT, offsetT, bias, y, nthreads))
}

void anybit_bitplane_gemm(const float* x, int64_t M, int64_t K, const uint64_t* wplanes, int64_t Npad, int64_t N,
                          int wbits, int wsigned, int64_t gsize, int64_t G, int64_t W, const float* sw,
                          const float* zw, const int64_t* wsum, int abits, int asym, int64_t agroup,
                          const float* bias, float* y, int nthreads) {
    DISPATCH(bitplane_gemm(x, M, K, wplanes, Npad, N, wbits, wsigned, gsize, G, W, sw, zw, wsum, abits, asym, agroup,
                           bias, y, nthreads))
}

// call in the namespace <prefix>_avx512, _avx2 or _portable, by the instruction set in use
#define DISPATCH_NS(prefix, call)           \
    if (anybit_get_isa() == 2)              \
        prefix##_avx512::call;              \
    else if (anybit_get_isa() == 1)         \
        prefix##_avx2::call;                \
    else                                    \
        prefix##_portable::call;
#define DISPATCH_DEC(call) DISPATCH_NS(dec, call)

// decoding-step operators (kernels_decode.inc)
void anybit_rmsnorm(const float* x, const float* w, float eps, float* out, int64_t rows, int64_t d) {
    DISPATCH_DEC(rmsnorm(x, w, eps, out, rows, d))
}

// scores: scratch of at least pos + 1 floats
void anybit_attn_decode(float* q, float* k, const float* v, float* kc, float* vc, int64_t maxT, int64_t pos,
                        const float* cos, const float* sin, int64_t H, int64_t Hkv, int64_t D, float scale,
                        const float* qn, const float* kn, float eps, float* out, float* scores) {
    DISPATCH_DEC(attn_decode(q, k, v, kc, vc, maxT, pos, cos, sin, H, Hkv, D, scale, qn, kn, eps, out, scores))
}

void anybit_silu_mul(const float* gu, int64_t rows, int64_t n, float* out) {
    DISPATCH_DEC(silu_mul(gu, rows, n, out))
}

#define DISPATCH_TRAIN(call) DISPATCH_NS(train, call)

// block-training operators (kernels_train.inc); w32 or w16 (bfloat16 bits) receives the weight
void anybit_pot_fake_weight(const float* log_abs, const float* sign, const float* lr, const float* lz,
                            const float* s, int64_t n, int64_t g, int64_t gs, int64_t k, int top, int zero,
                            float* levels, float* w32, uint16_t* w16, int nthreads) {
    DISPATCH_TRAIN(pot_fake_weight(log_abs, sign, lr, lz, s, n, g, gs, k, top, zero, levels, w32, w16, nthreads))
}

void anybit_fq_backward(const float* x, const float* gy, const float* s, const float* z, const float* xmax,
                        const float* xmin, int64_t groups, int64_t g, int top, float* gx, float* ds, float* gzp,
                        float* nmax, float* nmin, int nthreads) {
    DISPATCH_TRAIN(fq_backward(x, gy, s, z, xmax, xmin, groups, g, top, gx, ds, gzp, nmax, nmin, nthreads))
}

void anybit_fq_add_extremes(const float* x, const float* xmax, const float* xmin, const float* add_max,
                            const float* add_min, int64_t groups, int64_t g, float* gx, int nthreads) {
    DISPATCH_TRAIN(fq_add_extremes(x, xmax, xmin, add_max, add_min, groups, g, gx, nthreads))
}

// One prepared linear of the native decoding step (native.lin_struct builds it): kind 0 the
// int8-activation kernel (INT/PoT, possibly several layers fused along N), 1 BCQ (LUT-GEMM),
// 2 bit-plane (quantized activations; AND+popcount), 3 bit-plane as integer dot products
// (scales: sw, szs: the zero points a, alpha: U = Σ u), 4 float32 weights (w: [N, K] floats).
// Fields a kind does not use are zero.
struct AnybitLin {
    int64_t kind, K, N, threads;
    const float* bias;
    const uint8_t* w;  // q8 layout | BCQ planes | bit-plane words
    int64_t row_bytes, bits, gsize, G, B;
    const float *scales, *szs;  // q8: scales, s·z | bit-plane: sw, zw
    const uint8_t* table;
    int64_t Npad;  // BCQ, bit-plane
    const void* alpha;  // BCQ: α (float16) | bit-plane kind 3: U
    const float* offset;  // BCQ
    int64_t W, wsigned, abits, asym, agroup;  // bit-plane
    const int64_t* wsum;
};

// One decoder layer: Q/K/V as 1 (fused) or 3 linears, O, gate/up as 1 or 2, down.
struct AnybitLayer {
    const float* ln1;
    float eps1;
    AnybitLin qkv[3];
    int64_t n_qkv;
    AnybitLin o;
    const float* ln2;
    float eps2;
    AnybitLin gu[2];
    int64_t n_gu;
    AnybitLin down;
    const float *qn, *kn;
    float neps;
    float *kc, *vc;
};

// M activation rows on `threads` threads (the decoding step: 1 row, the struct's count)
static inline void lin_rows(const AnybitLin& p, const float* x, int64_t M, float* y, int threads) {
    switch (p.kind) {
        case 0:
            anybit_int_q8_gemm(x, M, p.K, p.w, p.row_bytes, p.N, (int)p.bits, p.gsize, p.G, p.B, p.scales, p.szs, p.bias,
                               y, threads, p.table);
            break;
        case 1:
            anybit_bcq_gemm(x, M, p.K, p.w, p.Npad, p.N, (int)p.bits, p.gsize, p.G, (const uint16_t*)p.alpha, p.offset, p.bias, y,
                            threads);
            break;
        case 4:
            DISPATCH_DEC(f32_gemm(x, M, p.K, reinterpret_cast<const float*>(p.w), p.N, p.bias, y, threads))
            break;
        case 3:
            anybit_bitplane_q8_gemm(x, M, p.K, p.w, p.row_bytes, (int)p.B, p.N, (int)p.bits, p.gsize, p.G, p.scales, p.szs,
                                    (const float*)p.alpha, (int)p.abits, (int)p.asym, p.agroup, p.bias, y, threads);
            break;
        default:
            anybit_bitplane_gemm(x, M, p.K, reinterpret_cast<const uint64_t*>(p.w), p.Npad, p.N, (int)p.bits,
                                 (int)p.wsigned, p.gsize, p.G, p.W, p.scales, p.szs, p.wsum, (int)p.abits, (int)p.asym,
                                 p.agroup, p.bias, y, threads);
            break;
    }
}

// One prepared linear at batch 1 (the decoding step's call), for timing its thread count.
static inline void lin_call(const AnybitLin& p, const float* x, float* y) { lin_rows(p, x, 1, y, (int)p.threads); }

void anybit_lin_call(const AnybitLin* p, const float* x, float* y) { lin_call(*p, x, y); }

// One prepared linear on M rows (native.FastLinear: an eager QuantLinear call with its
// constant arguments converted once).
void anybit_lin_rows(const AnybitLin* p, const float* x, int64_t M, float* y, int threads) {
    lin_rows(*p, x, M, y, threads);
}

// 1: the decoding step runs on one thread team (decode_layers_team), 0: one team per linear
// (the path before it, kept for comparisons: anybit_set_decode_team)
static int g_decode_team = 1;

int anybit_set_decode_team(int on) {
    const int old = g_decode_team;
    g_decode_team = on ? 1 : 0;
    return old;
}

// The largest thread count of a stack's linears (the team of decode_layers_team)
static int stack_threads(const AnybitLayer* layers, int64_t L) {
    int64_t t = 1;
    for (int64_t l = 0; l < L; ++l) {
        const AnybitLayer& ly = layers[l];
        for (int64_t j = 0; j < ly.n_qkv; ++j) t = std::max(t, ly.qkv[j].threads);
        for (int64_t j = 0; j < ly.n_gu; ++j) t = std::max(t, ly.gu[j].threads);
        t = std::max(t, std::max(ly.o.threads, ly.down.threads));
    }
    return (int)t;
}

// anybit_decode_layers on one team of nthreads threads for the whole stack. Each thread keeps
// its own copy of the residual x and of its norm (the same float operations in the same
// order on every thread, so the copies agree) and quantizes the linears' input itself; what
// the threads share is each linear's output rows (every linear ends with the barrier of its
// row loop), the attention heads and the SiLU. Per layer: 7 barriers and no serial section,
// against 4 forks and joins, 4 inner barriers and the norms, attention and SiLU on one
// thread while the others wait.
// qkv, a, gu, m, o: the shared scratch of anybit_decode_layers (each thread's norm output and
// attention scores are its own).
static void decode_layers_team(const AnybitLayer* layers, int64_t L, float* x, int64_t d, int64_t H, int64_t Hkv,
                               int64_t D, int64_t ffn, int64_t maxT, int64_t pos, const float* cos, const float* sin,
                               float scale, float* qkv, float* a, float* gu, float* m, float* o, int nthreads) {
    const int64_t rep = H / Hkv, SPAN = 64, nspan = (ffn + SPAN - 1) / SPAN;
#pragma omp parallel num_threads(nthreads)
    {
        t_team = true;
        std::vector<float> own(2 * d + maxT);
        float *xp = own.data(), *h = xp + d, *scores = h + d;
        std::memcpy(xp, x, d * sizeof(float));
        for (int64_t l = 0; l < L; ++l) {
            const AnybitLayer& ly = layers[l];
            anybit_rmsnorm(xp, ly.ln1, ly.eps1, h, 1, d);
            for (int64_t j = 0, off = 0; j < ly.n_qkv; off += ly.qkv[j].N, ++j) lin_call(ly.qkv[j], h, qkv + off);
            float *q = qkv, *k = qkv + H * D, *v = k + Hkv * D;
#pragma omp for schedule(static)
            for (int64_t g = 0; g < Hkv; ++g)
                DISPATCH_DEC(kv_store(k + g * D, v + g * D, ly.kc, ly.vc, maxT, pos, g, D, ly.kn, ly.neps, cos, sin))
#pragma omp for schedule(static)
            for (int64_t hh = 0; hh < H; ++hh) {
                const int64_t g = hh / rep;
                DISPATCH_DEC(attn_head(q + hh * D, ly.kc + g * maxT * D, ly.vc + g * maxT * D, pos + 1, D, scale, ly.qn,
                                       ly.neps, cos, sin, a + hh * D, scores))
            }
            lin_call(ly.o, a, o);
            for (int64_t i = 0; i < d; ++i) xp[i] += o[i];
            anybit_rmsnorm(xp, ly.ln2, ly.eps2, h, 1, d);
            for (int64_t j = 0, off = 0; j < ly.n_gu; off += ly.gu[j].N, ++j) lin_call(ly.gu[j], h, gu + off);
#pragma omp for schedule(static)
            for (int64_t s = 0; s < nspan; ++s) {
                const int64_t i0 = s * SPAN, n = std::min(SPAN, ffn - i0);
                DISPATCH_DEC(silu_mul_span(gu + i0, gu + ffn + i0, n, m + i0))
            }
            lin_call(ly.down, m, o);
            for (int64_t i = 0; i < d; ++i) xp[i] += o[i];
        }
#pragma omp master
        std::memcpy(x, xp, d * sizeof(float));
        t_team = false;
    }
}

// The whole transformer stack for one token at position pos: x [d] (the embedding in, the
// last hidden state out, before the final norm). buf: scratch of 2·d + (2·H + 2·Hkv)·D +
// 3·ffn + maxT floats.
void anybit_decode_layers(const AnybitLayer* layers, int64_t L, float* x, int64_t d, int64_t H, int64_t Hkv,
                          int64_t D, int64_t ffn, int64_t maxT, int64_t pos, const float* cos, const float* sin,
                          float scale, float* buf) {
    float* h = buf;
    float* qkv = h + d;
    float* a = qkv + (H + 2 * Hkv) * D;
    float* gu = a + H * D;
    float* m = gu + 2 * ffn;
    float* o = m + ffn;
    float* scores = o + d;
    const int nthreads = stack_threads(layers, L);
    if (g_decode_team && nthreads > 1) {
        decode_layers_team(layers, L, x, d, H, Hkv, D, ffn, maxT, pos, cos, sin, scale, qkv, a, gu, m, o, nthreads);
        return;
    }
    for (int64_t l = 0; l < L; ++l) {
        const AnybitLayer& ly = layers[l];
        anybit_rmsnorm(x, ly.ln1, ly.eps1, h, 1, d);
        for (int64_t j = 0, off = 0; j < ly.n_qkv; off += ly.qkv[j].N, ++j) lin_call(ly.qkv[j], h, qkv + off);
        anybit_attn_decode(qkv, qkv + H * D, qkv + (H + Hkv) * D, ly.kc, ly.vc, maxT, pos, cos, sin, H, Hkv, D, scale,
                           ly.qn, ly.kn, ly.neps, a, scores);
        lin_call(ly.o, a, o);
        for (int64_t i = 0; i < d; ++i) x[i] += o[i];
        anybit_rmsnorm(x, ly.ln2, ly.eps2, h, 1, d);
        for (int64_t j = 0, off = 0; j < ly.n_gu; off += ly.gu[j].N, ++j) lin_call(ly.gu[j], h, gu + off);
        anybit_silu_mul(gu, 1, ffn, m);
        lin_call(ly.down, m, o);
        for (int64_t i = 0; i < d; ++i) x[i] += o[i];
    }
}

}  // extern "C"

// A valid (empty) Python module too, so that the build system and importlib can find it;
// the functions above are reached through ctypes.
static struct PyModuleDef anybit_native_module = {PyModuleDef_HEAD_INIT, "_native",
                                                  "anybit native kernels (C ABI, used through ctypes)", -1,
                                                  nullptr};
PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&anybit_native_module); }
