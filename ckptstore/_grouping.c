/*
 * Byte grouping of floats in one pass per chunk: the compiled twin of the numpy
 * transforms in _codec.py (whose docstring defines the format; read it first).
 *
 * Why this exists: the numpy version makes about a dozen passes over every chunk
 * (rotate, split, window, escape, pack; and back), which cost more than zstd itself
 * (numpy 76 ms vs zstd 52 ms to decode 91 MB of float32 on one core). Here each
 * element is loaded once and every plane is written in the same loop, with the GIL
 * released, so the writer's and the reader's threads run on all cores.
 *
 * The numpy functions stay: they are the reference the tests compare these against
 * byte for byte, and the fallback where this module was not compiled.
 *
 * Element layout (little endian, `width` bytes): rotated left by one bit, the top byte
 * `top` and the next byte `nxt` of the rotated word are recoded into plane A
 * `(code << k) | (nxt >> (8 - k))`, code = top - lo (mod 256) inside the window, else
 * `window` plus an escape byte; plane B holds `nxt`'s low 8 - k bits (nibbles packed two
 * to a byte, the first in the low half, when k == 4); the other bytes go to planes,
 * most significant first.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#define MAX_WIDTH 8

/* Bytes that n 6-bit values take bit-packed (the p tags; see pack6_kernel). */
static inline Py_ssize_t packed6_size(Py_ssize_t n) { return (6 * n + 7) / 8; }

static inline uint64_t load_word(const uint8_t *p, int width) {
    uint64_t w = 0;
    memcpy(&w, p, (size_t)width); /* little-endian host: see the check in the module init */
    return w;
}

static inline uint64_t rotl1(uint64_t w, int bits) {
    uint64_t mask = bits == 64 ? ~(uint64_t)0 : (((uint64_t)1 << bits) - 1);
    return ((w << 1) | (w >> (bits - 1))) & mask;
}

static inline uint64_t rotr1(uint64_t w, int bits) {
    return (w >> 1) | ((w & 1) << (bits - 1));
}

/* Top byte of the element at p rotated left by one bit: its last byte shifted up, with
 * the top bit of the byte below it (the sign moves to the bottom of the element). */
static inline unsigned top_byte(const uint8_t *p, int width) {
    return ((unsigned)p[width - 1] << 1 | p[width - 2] >> 7) & 0xFF;
}

/* The loops below are written once and inlined with constant width at each call site,
 * so that the compiler unrolls the per-byte work (a generic loop ran at half the speed of
 * numpy). */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* The joint variants are bg2j2, bg4j2 and bg8j2 (_codec._JOINT_BITS), and bg2j4, which
 * earlier versions wrote for 2-byte floats (kept for reading them, and split for the tests
 * that produce such chunks); each has its own
 * loop so that the element is a native integer and the main pass has no branch: codes
 * are clamped to the escape code there, and a second pass, run only when some top byte
 * fell outside the window, collects the escaped bytes in order. Plain loops like these
 * are what gcc -O3 vectorises. */

/* AVX2 where the CPU has it, chosen at load time (gcc/clang on glibc); the baseline
 * build elsewhere. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#define HAVE_AVX2_PATHS 1
#include <immintrin.h>
#else
#define CLONES
#endif

#ifdef HAVE_AVX2_PATHS
/* 32 six-bit values from 24 bytes at `in` (28 must be readable): each 128-bit half loads
 * 16 bytes and spreads its four groups into 32-bit lanes (vpshufb), and each lane w
 * becomes the four bytes w & 63, (w >> 6) & 63, ... by three shifts and masks. gcc does
 * not find this from the scalar loop, which ran at 0.41 ns a value. */
__attribute__((target("avx2"))) static inline __m256i unpack6_32(const uint8_t *in) {
    const __m256i spread = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10,
                                            11, -1, 0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8,
                                            -1, 9, 10, 11, -1);
    const __m256i m0 = _mm256_set1_epi32(0x3F), m1 = _mm256_set1_epi32(0x3F00),
                  m2 = _mm256_set1_epi32(0x3F0000), m3 = _mm256_set1_epi32(0x3F000000);
    __m128i lo = _mm_loadu_si128((const __m128i *)in);
    __m128i hi = _mm_loadu_si128((const __m128i *)(in + 12));
    __m256i w = _mm256_shuffle_epi8(_mm256_set_m128i(hi, lo), spread);
    return _mm256_or_si256(
        _mm256_or_si256(_mm256_and_si256(w, m0), _mm256_and_si256(_mm256_slli_epi32(w, 2), m1)),
        _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi32(w, 4), m2),
                        _mm256_and_si256(_mm256_slli_epi32(w, 6), m3)));
}

/* The top two bytes of 32 rotated j2 words from plane A and plane B: high = code + lo
 * (escape codes come out wrong and are replaced afterwards), next = the two joint bits
 * over plane B's six. Byte-wise a >> 2 and a << 6 through 16-bit shifts, then masks. */
__attribute__((target("avx2"))) static inline void j2_top_bytes(__m256i a, __m256i b,
                                                                __m256i base, __m256i *high,
                                                                __m256i *next) {
    *high = _mm256_add_epi8(_mm256_and_si256(_mm256_srli_epi16(a, 2), _mm256_set1_epi8(0x3F)),
                            base);
    *next = _mm256_or_si256(
        _mm256_and_si256(_mm256_slli_epi16(a, 6), _mm256_set1_epi8((char)0xC0)), b);
}
#endif

#define ROTL(T, x) ((T)(((x) << 1) | ((x) >> (8 * sizeof(T) - 1))))
#define ROTR(T, x) ((T)(((x) >> 1) | ((x) << (8 * sizeof(T) - 1))))

/* Escapes are rare (a few hundred in a million elements), so both escape passes below
 * walk plane A in blocks and look inside a block only when one of its bytes carries the
 * escape code (`byte >= window << k`): the block test is a vectorised compare, where a
 * plain element loop with a branch ran at a third of the speed of the main pass. */
#define ESCAPE_BLOCK 64

ALWAYS_INLINE int block_has_escape(const uint8_t *pa, Py_ssize_t len, unsigned threshold) {
    unsigned hit = 0;
    for (Py_ssize_t j = 0; j < len; j++) hit |= pa[j] >= threshold;
    return hit != 0;
}

#define FOR_EACH_ESCAPE(i, THRESHOLD)                                               \
    for (Py_ssize_t start = 0; start < n; start += ESCAPE_BLOCK)                    \
        if (block_has_escape(pa + start, n - start < ESCAPE_BLOCK ? n - start : ESCAPE_BLOCK, \
                             (THRESHOLD)))                                          \
            for (Py_ssize_t i = start; i < n && i < start + ESCAPE_BLOCK; i++)      \
                if (pa[i] >= (THRESHOLD))

/* Pass 2 of a split: the top bytes outside the window, in element order (the elements
 * whose plane A byte the main pass set to the escape code). */
#define COLLECT_ESCAPES(T, BITS, WINDOW, K)                                  \
    Py_ssize_t escapes = 0;                                                  \
    if (outside)                                                             \
        FOR_EACH_ESCAPE(i, (unsigned)(WINDOW) << (K)) {                      \
            T x;                                                             \
            memcpy(&x, in + i * sizeof(T), sizeof(T));                       \
            pe[escapes++] = (uint8_t)(ROTL(T, x) >> (BITS - 8));             \
        }                                                                    \
    return escapes;

/* bf16/fp16 go two elements at a time, all in 32-bit lanes: two words in, two plane A
 * bytes (one 16-bit store) and one nibble byte out. Written element by element, with the
 * two halves in separate calls, gcc left the loop scalar (3 GB/s against 11 for 4j2). */
ALWAYS_INLINE uint32_t rotl16(uint32_t x) { return ((x << 1) | (x >> 15)) & 0xFFFF; }

/* Plane A byte of one rotated 16-bit word `w`, with k joint bits (a constant at each
 * call site). */
ALWAYS_INLINE uint32_t code_2j(uint32_t w, unsigned lo, uint32_t *outside, const int k) {
    const uint32_t window = (1u << (8 - k)) - 1;
    uint32_t code = ((w >> 8) - lo) & 0xFF;
    *outside |= code >= window;
    code = code < window ? code : window;
    return (code << k) | ((w >> (8 - k)) & ((1u << k) - 1));
}

CLONES static Py_ssize_t split_2j4(const uint8_t *restrict in, Py_ssize_t n, unsigned lo,
                                   uint8_t *restrict pa, uint8_t *restrict pb,
                                   uint8_t *restrict pe) {
    uint32_t outside = 0;
    for (Py_ssize_t m = 0; m < n / 2; m++) { /* nibbles: the even element in the low half */
        uint32_t pair;
        memcpy(&pair, in + 4 * m, 4);
        uint32_t w0 = rotl16(pair & 0xFFFF), w1 = rotl16(pair >> 16);
        uint16_t codes = (uint16_t)(code_2j(w0, lo, &outside, 4) | code_2j(w1, lo, &outside, 4) << 8);
        memcpy(pa + 2 * m, &codes, 2);
        pb[m] = (uint8_t)((w0 & 0xF) | (w1 & 0xF) << 4);
    }
    if (n & 1) {
        uint16_t x;
        memcpy(&x, in + 2 * (n - 1), 2);
        uint32_t w = rotl16(x);
        pa[n - 1] = (uint8_t)code_2j(w, lo, &outside, 4);
        pb[n / 2] = (uint8_t)(w & 0xF);
    }
    COLLECT_ESCAPES(uint16_t, 16, 15, 4)
}

/* bf16/fp16 with two joint bits: plane B is a full byte per element (6 bits, packed
 * afterwards when uniform), so no nibble pairing; still two elements per 32-bit load. */

CLONES static Py_ssize_t split_2j2(const uint8_t *restrict in, Py_ssize_t n, unsigned lo,
                                   uint8_t *restrict pa, uint8_t *restrict pb,
                                   uint8_t *restrict pe) {
    uint32_t outside = 0;
    for (Py_ssize_t m = 0; m < n / 2; m++) {
        uint32_t pair;
        memcpy(&pair, in + 4 * m, 4);
        uint32_t w0 = rotl16(pair & 0xFFFF), w1 = rotl16(pair >> 16);
        uint16_t codes = (uint16_t)(code_2j(w0, lo, &outside, 2) | code_2j(w1, lo, &outside, 2) << 8);
        uint16_t low = (uint16_t)((w0 & 63) | (w1 & 63) << 8);
        memcpy(pa + 2 * m, &codes, 2);
        memcpy(pb + 2 * m, &low, 2);
    }
    if (n & 1) {
        uint16_t x;
        memcpy(&x, in + 2 * (n - 1), 2);
        uint32_t w = rotl16(x);
        pa[n - 1] = (uint8_t)code_2j(w, lo, &outside, 2);
        pb[n - 1] = (uint8_t)(w & 63);
    }
    COLLECT_ESCAPES(uint16_t, 16, 63, 2)
}

CLONES static Py_ssize_t split_4j2(const uint8_t *restrict in, Py_ssize_t n, unsigned lo,
                            uint8_t *restrict pa, uint8_t *restrict pb, uint8_t *restrict r0,
                            uint8_t *restrict r1, uint8_t *restrict pe) {
    unsigned outside = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t x;
        memcpy(&x, in + 4 * i, 4);
        uint32_t w = ROTL(uint32_t, x);
        unsigned nxt = (w >> 16) & 0xFF;
        unsigned code = ((w >> 24) - lo) & 0xFF;
        outside |= code >= 63;
        code = code < 63 ? code : 63;
        pa[i] = (uint8_t)((code << 2) | (nxt >> 6));
        pb[i] = (uint8_t)(nxt & 63);
        r0[i] = (uint8_t)(w >> 8);
        r1[i] = (uint8_t)w;
    }
    COLLECT_ESCAPES(uint32_t, 32, 63, 2)
}

CLONES static Py_ssize_t split_8j2(const uint8_t *restrict in, Py_ssize_t n, unsigned lo,
                            uint8_t *restrict pa, uint8_t *restrict pb, uint8_t *const *rest,
                            uint8_t *restrict pe) {
    uint8_t *restrict r0 = rest[0], *restrict r1 = rest[1], *restrict r2 = rest[2];
    uint8_t *restrict r3 = rest[3], *restrict r4 = rest[4], *restrict r5 = rest[5];
    unsigned outside = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t x;
        memcpy(&x, in + 8 * i, 8);
        uint64_t w = ROTL(uint64_t, x);
        unsigned nxt = (unsigned)(w >> 48) & 0xFF;
        unsigned code = ((unsigned)(w >> 56) - lo) & 0xFF;
        outside |= code >= 63;
        code = code < 63 ? code : 63;
        pa[i] = (uint8_t)((code << 2) | (nxt >> 6));
        pb[i] = (uint8_t)(nxt & 63);
        r0[i] = (uint8_t)(w >> 40);
        r1[i] = (uint8_t)(w >> 32);
        r2[i] = (uint8_t)(w >> 24);
        r3[i] = (uint8_t)(w >> 16);
        r4[i] = (uint8_t)(w >> 8);
        r5[i] = (uint8_t)w;
    }
    COLLECT_ESCAPES(uint64_t, 64, 63, 2)
}

/* Pass 2 of a merge: put the escaped top bytes back. Returns the escapes used, or
 * n_esc + 1 when the codes need more than there are. */
#define RESTORE_ESCAPES(T, BITS, K)                                                  \
    Py_ssize_t used = 0;                                                             \
    FOR_EACH_ESCAPE(i, ((1u << (8 - (K))) - 1) << (K)) {                             \
        if (used == n_esc) return n_esc + 1;                                         \
        T x;                                                                         \
        memcpy(&x, dst + i * sizeof(T), sizeof(T));                                  \
        T w = ROTL(T, x);                                                            \
        w = (T)((w & (((T)1 << (BITS - 8)) - 1)) | ((T)pe[used++] << (BITS - 8)));  \
        x = ROTR(T, w);                                                              \
        memcpy(dst + i * sizeof(T), &x, sizeof(T));                                  \
    }                                                                                \
    return used;

/* The 16-bit element from its plane A byte `a` and its plane B bits `low` (k joint bits,
 * a constant at each call site). */
ALWAYS_INLINE uint32_t word_2j(uint32_t a, uint32_t low, unsigned lo, const int k) {
    uint32_t w = (((a >> k) + lo) & 0xFF) << 8 | ((a << (8 - k)) & 0xFF) | low; /* rotated */
    return (w >> 1) | ((w & 1) << 15);
}

/* Two elements per nibble byte, in 32-bit lanes (see split_2j4). */
CLONES static Py_ssize_t merge_2j4(uint8_t *restrict dst, Py_ssize_t n, unsigned lo,
                                   const uint8_t *restrict pa, const uint8_t *restrict pb,
                                   const uint8_t *restrict pe, Py_ssize_t n_esc) {
    for (Py_ssize_t m = 0; m < n / 2; m++) {
        uint16_t codes;
        memcpy(&codes, pa + 2 * m, 2);
        uint32_t b = pb[m];
        uint32_t x0 = word_2j(codes & 0xFFu, b & 0xF, lo, 4);
        uint32_t x1 = word_2j((uint32_t)codes >> 8, b >> 4, lo, 4);
        uint32_t pair = x0 | (x1 << 16);
        memcpy(dst + 4 * m, &pair, 4);
    }
    if (n & 1) {
        uint16_t x = (uint16_t)word_2j(pa[n - 1], pb[n / 2] & 0xF, lo, 4);
        memcpy(dst + 2 * (n - 1), &x, 2);
    }
    RESTORE_ESCAPES(uint16_t, 16, 4)
}

CLONES static Py_ssize_t merge_2j2(uint8_t *restrict dst, Py_ssize_t n, unsigned lo,
                                   const uint8_t *restrict pa, const uint8_t *restrict pb,
                                   const uint8_t *restrict pe, Py_ssize_t n_esc) {
    for (Py_ssize_t m = 0; m < n / 2; m++) {
        uint16_t codes, low;
        memcpy(&codes, pa + 2 * m, 2);
        memcpy(&low, pb + 2 * m, 2);
        uint32_t x0 = word_2j(codes & 0xFFu, low & 0xFFu, lo, 2);
        uint32_t x1 = word_2j((uint32_t)codes >> 8, (uint32_t)low >> 8, lo, 2);
        uint32_t pair = x0 | (x1 << 16);
        memcpy(dst + 4 * m, &pair, 4);
    }
    if (n & 1) {
        uint16_t x = (uint16_t)word_2j(pa[n - 1], pb[n - 1], lo, 2);
        memcpy(dst + 2 * (n - 1), &x, 2);
    }
    RESTORE_ESCAPES(uint16_t, 16, 2)
}

#ifdef HAVE_AVX2_PATHS
/* bg2j2p in one pass: 32 elements a step, plane B unpacked in registers as in
 * unpack6_avx2, each element's rotated word built from its bytes (high = code + lo,
 * low = the two joint bits over plane B's six) and rotated back in 16-bit lanes. In three
 * passes (unpack, plane B check, merge) bf16 MiniLM decoded at 2.0 GB/s, fused at 2.8. 
 * Escape codes come out with a wrong top byte, which RESTORE_ESCAPES then replaces, as
 * in merge_2j2. Returns the elements done (a multiple of 4); the caller finishes. */
__attribute__((target("avx2"))) static Py_ssize_t merge_2j2p_avx2(
    uint8_t *dst, Py_ssize_t n, unsigned lo, const uint8_t *pa, const uint8_t *packed,
    Py_ssize_t packed_len) {
    const __m256i base = _mm256_set1_epi8((char)lo);
    Py_ssize_t i = 0;
    for (; i + 32 <= n && 3 * (i / 4) + 28 <= packed_len; i += 32) {
        __m256i high, low;
        j2_top_bytes(_mm256_loadu_si256((const __m256i *)(pa + i)),
                     unpack6_32(packed + 3 * (i / 4)), base, &high, &low);
        __m256i words_lo = _mm256_unpacklo_epi8(low, high); /* elements 0-7 | 16-23 */
        __m256i words_hi = _mm256_unpackhi_epi8(low, high); /* elements 8-15 | 24-31 */
        words_lo = _mm256_or_si256(_mm256_srli_epi16(words_lo, 1), _mm256_slli_epi16(words_lo, 15));
        words_hi = _mm256_or_si256(_mm256_srli_epi16(words_hi, 1), _mm256_slli_epi16(words_hi, 15));
        _mm256_storeu_si256((__m256i *)(dst + 2 * i),
                            _mm256_permute2x128_si256(words_lo, words_hi, 0x20));
        _mm256_storeu_si256((__m256i *)(dst + 2 * i + 32),
                            _mm256_permute2x128_si256(words_lo, words_hi, 0x31));
    }
    return i;
}

/* bg4j2p likewise: the four byte planes interleaved into 32-bit words (in-lane unpacks
 * scramble the order, which the 128-bit permutes at the end put back), rotated back. */
__attribute__((target("avx2"))) static inline __m256i rotr1_32(__m256i w) {
    return _mm256_or_si256(_mm256_srli_epi32(w, 1), _mm256_slli_epi32(w, 31));
}

__attribute__((target("avx2"))) static Py_ssize_t merge_4j2p_avx2(
    uint8_t *dst, Py_ssize_t n, unsigned lo, const uint8_t *pa, const uint8_t *packed,
    Py_ssize_t packed_len, const uint8_t *r0, const uint8_t *r1) {
    const __m256i base = _mm256_set1_epi8((char)lo);
    Py_ssize_t i = 0;
    for (; i + 32 <= n && 3 * (i / 4) + 28 <= packed_len; i += 32) {
        __m256i high, next;
        j2_top_bytes(_mm256_loadu_si256((const __m256i *)(pa + i)),
                     unpack6_32(packed + 3 * (i / 4)), base, &high, &next);
        __m256i b1 = _mm256_loadu_si256((const __m256i *)(r0 + i));
        __m256i b0 = _mm256_loadu_si256((const __m256i *)(r1 + i));
        __m256i low_lo = _mm256_unpacklo_epi8(b0, b1), low_hi = _mm256_unpackhi_epi8(b0, b1);
        __m256i top_lo = _mm256_unpacklo_epi8(next, high), top_hi = _mm256_unpackhi_epi8(next, high);
        __m256i w0 = rotr1_32(_mm256_unpacklo_epi16(low_lo, top_lo)); /* 0-3 | 16-19 */
        __m256i w1 = rotr1_32(_mm256_unpackhi_epi16(low_lo, top_lo)); /* 4-7 | 20-23 */
        __m256i w2 = rotr1_32(_mm256_unpacklo_epi16(low_hi, top_hi)); /* 8-11 | 24-27 */
        __m256i w3 = rotr1_32(_mm256_unpackhi_epi16(low_hi, top_hi)); /* 12-15 | 28-31 */
        uint8_t *out = dst + 4 * i;
        _mm256_storeu_si256((__m256i *)out, _mm256_permute2x128_si256(w0, w1, 0x20));
        _mm256_storeu_si256((__m256i *)(out + 32), _mm256_permute2x128_si256(w2, w3, 0x20));
        _mm256_storeu_si256((__m256i *)(out + 64), _mm256_permute2x128_si256(w0, w1, 0x31));
        _mm256_storeu_si256((__m256i *)(out + 96), _mm256_permute2x128_si256(w2, w3, 0x31));
    }
    return i;
}
#endif

/* Group g of a packed plane B as one 24-bit word, from the bytes that its `left` (1-4)
 * values reach; bits above 6 * left are the padding, which the callers check. */
ALWAYS_INLINE uint32_t packed_group(const uint8_t *packed, Py_ssize_t g, Py_ssize_t left) {
    uint32_t w = 0;
    for (Py_ssize_t j = 0; j < (6 * left + 7) / 8; j++) w |= (uint32_t)packed[3 * g + j] << (8 * j);
    return w;
}

/* Returns the escapes used (as merge_2j2), or -1 when a padding bit of plane B is set. */
CLONES static Py_ssize_t merge_2j2p(uint8_t *restrict dst, Py_ssize_t n, unsigned lo,
                                    const uint8_t *restrict pa,
                                    const uint8_t *restrict packed, Py_ssize_t packed_len,
                                    const uint8_t *restrict pe, Py_ssize_t n_esc) {
    Py_ssize_t start = 0;
#ifdef HAVE_AVX2_PATHS
    if (__builtin_cpu_supports("avx2")) start = merge_2j2p_avx2(dst, n, lo, pa, packed, packed_len);
#endif
    for (Py_ssize_t g = start / 4; 4 * g < n; g++) { /* whole and partial groups */
        Py_ssize_t left = n - 4 * g < 4 ? n - 4 * g : 4;
        uint32_t w = packed_group(packed, g, left);
        if (left < 4 && (w >> (6 * left))) return -1;
        for (Py_ssize_t j = 0; j < left; j++) {
            Py_ssize_t e = 4 * g + j;
            uint16_t x = (uint16_t)word_2j(pa[e], (w >> (6 * j)) & 63, lo, 2);
            memcpy(dst + 2 * e, &x, 2);
        }
    }
    RESTORE_ESCAPES(uint16_t, 16, 2)
}

CLONES static Py_ssize_t merge_4j2(uint8_t *restrict dst, Py_ssize_t n, unsigned lo,
                            const uint8_t *restrict pa, const uint8_t *restrict pb,
                            const uint8_t *restrict r0, const uint8_t *restrict r1,
                            const uint8_t *restrict pe, Py_ssize_t n_esc) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t a = pa[i];
        uint32_t w = (((a >> 2) + lo) & 0xFF) << 24 | (((a << 6) | pb[i]) & 0xFF) << 16 |
                     (uint32_t)r0[i] << 8 | r1[i];
        uint32_t x = ROTR(uint32_t, w);
        memcpy(dst + 4 * i, &x, 4);
    }
    RESTORE_ESCAPES(uint32_t, 32, 2)
}

/* Returns the escapes used (as merge_4j2), or -1 when a padding bit of plane B is set. */
CLONES static Py_ssize_t merge_4j2p(uint8_t *restrict dst, Py_ssize_t n, unsigned lo,
                                    const uint8_t *restrict pa,
                                    const uint8_t *restrict packed, Py_ssize_t packed_len,
                                    const uint8_t *restrict r0, const uint8_t *restrict r1,
                                    const uint8_t *restrict pe, Py_ssize_t n_esc) {
    Py_ssize_t start = 0;
#ifdef HAVE_AVX2_PATHS
    if (__builtin_cpu_supports("avx2"))
        start = merge_4j2p_avx2(dst, n, lo, pa, packed, packed_len, r0, r1);
#endif
    for (Py_ssize_t g = start / 4; 4 * g < n; g++) { /* whole and partial groups */
        Py_ssize_t left = n - 4 * g < 4 ? n - 4 * g : 4;
        uint32_t v = packed_group(packed, g, left);
        if (left < 4 && (v >> (6 * left))) return -1;
        for (Py_ssize_t j = 0; j < left; j++) {
            Py_ssize_t e = 4 * g + j;
            uint32_t a = pa[e];
            uint32_t w = (((a >> 2) + lo) & 0xFF) << 24 | (((a << 6) | ((v >> (6 * j)) & 63)) & 0xFF) << 16 |
                         (uint32_t)r0[e] << 8 | r1[e];
            uint32_t x = ROTR(uint32_t, w);
            memcpy(dst + 4 * e, &x, 4);
        }
    }
    RESTORE_ESCAPES(uint32_t, 32, 2)
}

CLONES static Py_ssize_t merge_8j2(uint8_t *restrict dst, Py_ssize_t n, unsigned lo,
                            const uint8_t *restrict pa, const uint8_t *restrict pb,
                            const uint8_t *const *rest, const uint8_t *restrict pe,
                            Py_ssize_t n_esc) {
    const uint8_t *restrict r0 = rest[0], *restrict r1 = rest[1], *restrict r2 = rest[2];
    const uint8_t *restrict r3 = rest[3], *restrict r4 = rest[4], *restrict r5 = rest[5];
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t a = pa[i];
        uint64_t w = (((a >> 2) + lo) & 0xFF) << 56 | (((a << 6) | pb[i]) & 0xFF) << 48 |
                     (uint64_t)r0[i] << 40 | (uint64_t)r1[i] << 32 | (uint64_t)r2[i] << 24 |
                     (uint64_t)r3[i] << 16 | (uint64_t)r4[i] << 8 | r5[i];
        uint64_t x = ROTR(uint64_t, w);
        memcpy(dst + 8 * i, &x, 8);
    }
    RESTORE_ESCAPES(uint64_t, 64, 2)
}

ALWAYS_INLINE void split_planes_kernel(const uint8_t *in, Py_ssize_t n, const int width,
                                       uint8_t **planes) {
    const int bits = 8 * width;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t w = rotl1(load_word(in + i * width, width), bits);
        for (int j = 0; j < width; j++) planes[j][i] = (uint8_t)(w >> (bits - 8 - 8 * j));
    }
}

ALWAYS_INLINE void merge_planes_kernel(uint8_t *dst, Py_ssize_t n, const int width,
                                       const uint8_t **planes) {
    const int bits = 8 * width;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t w = 0;
        for (int j = 0; j < width; j++) w |= (uint64_t)planes[j][i] << (bits - 8 - 8 * j);
        w = rotr1(w, bits);
        memcpy(dst + i * width, &w, (size_t)width);
    }
}

/* Plane B of the j2 variants holds 6-bit values; where they are as good as uniform
 * (the low mantissa bits of trained weights) the `p` tags store them packed, four to
 * three bytes, instead of Huffman-coding them: the same size, and no entropy decoder to
 * run on a quarter of a float32 chunk. Layout: v0 | v1 << 6 | v2 << 12 | v3 << 18 as
 * three little-endian bytes per group; a last partial group keeps only the bytes its
 * bits reach, with zero padding bits. */
#ifdef HAVE_AVX2_PATHS
/* Eight groups per step, the inverse of unpack6_avx2: shifts and masks join each 32-bit
 * lane's four values into 24 bits, vpshufb gathers each half's four groups into its low
 * 12 bytes, and the halves are stored 12 bytes apart, in order, so that the high half's
 * store overwrites the low half's four spare bytes (and the next step the high half's).
 * Returns the groups done; the caller finishes. */
__attribute__((target("avx2"))) static Py_ssize_t pack6_avx2(const uint8_t *in,
                                                             Py_ssize_t groups,
                                                             uint8_t *out) {
    const __m256i gather = _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1,
                                            -1, -1, 0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13,
                                            14, -1, -1, -1, -1);
    const __m256i m0 = _mm256_set1_epi32(0x3F), m1 = _mm256_set1_epi32(0xFC0),
                  m2 = _mm256_set1_epi32(0x3F000), m3 = _mm256_set1_epi32(0xFC0000);
    Py_ssize_t g = 0;
    /* the high half's 16-byte store reaches 3 * g + 28 */
    for (; 3 * g + 28 <= 3 * groups; g += 8) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(in + 4 * g));
        __m256i w = _mm256_or_si256(
            _mm256_or_si256(_mm256_and_si256(x, m0),
                            _mm256_and_si256(_mm256_srli_epi32(x, 2), m1)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(x, 4), m2),
                            _mm256_and_si256(_mm256_srli_epi32(x, 6), m3)));
        w = _mm256_shuffle_epi8(w, gather);
        _mm_storeu_si128((__m128i *)(out + 3 * g), _mm256_castsi256_si128(w));
        _mm_storeu_si128((__m128i *)(out + 3 * g + 12), _mm256_extracti128_si256(w, 1));
    }
    return g;
}
#endif

CLONES static void pack6_kernel(const uint8_t *restrict in, Py_ssize_t n,
                                uint8_t *restrict out) {
    Py_ssize_t groups = n / 4, g = 0;
#ifdef HAVE_AVX2_PATHS
    if (__builtin_cpu_supports("avx2")) g = pack6_avx2(in, groups, out);
#endif
    for (; g < groups; g++) {
        const uint8_t *v = in + 4 * g;
        uint32_t w = (uint32_t)(v[0] & 63) | (uint32_t)(v[1] & 63) << 6 |
                     (uint32_t)(v[2] & 63) << 12 | (uint32_t)(v[3] & 63) << 18;
        out[3 * g] = (uint8_t)w;
        out[3 * g + 1] = (uint8_t)(w >> 8);
        out[3 * g + 2] = (uint8_t)(w >> 16);
    }
    Py_ssize_t tail = n - 4 * groups;
    if (tail) {
        uint32_t w = 0;
        for (Py_ssize_t j = 0; j < tail; j++) w |= (uint32_t)(in[4 * groups + j] & 63) << (6 * j);
        for (Py_ssize_t j = 0; j < (6 * tail + 7) / 8; j++) out[3 * groups + j] = (uint8_t)(w >> (8 * j));
    }
}

#ifdef HAVE_AVX2_PATHS
/* Eight groups (24 bytes, 32 values) per step. Returns the groups done; the caller
 * finishes. */
__attribute__((target("avx2"))) static Py_ssize_t unpack6_avx2(const uint8_t *in,
                                                               Py_ssize_t groups,
                                                               uint8_t *out) {
    Py_ssize_t g = 0;
    for (; 3 * g + 28 <= 3 * groups; g += 8)  /* the upper half loads bytes 12..27 */
        _mm256_storeu_si256((__m256i *)(out + 4 * g), unpack6_32(in + 3 * g));
    return g;
}

#endif

/* Returns nonzero when a padding bit of the last partial group is set. */
CLONES static int unpack6_kernel(const uint8_t *restrict in, Py_ssize_t n,
                                 uint8_t *restrict out) {
    Py_ssize_t done = 0; /* groups unpacked by the vector path */
#ifdef HAVE_AVX2_PATHS
    if (__builtin_cpu_supports("avx2")) done = unpack6_avx2(in, n / 4, out);
#endif
    /* Two groups (six bytes, eight values) per step, one 8-byte store: twice the speed
     * of one group per step. */
    in += 3 * done, out += 4 * done, n -= 4 * done;
    Py_ssize_t steps = packed6_size(n) >= 8 ? (packed6_size(n) - 8) / 6 + 1 : 0;
    if (steps > n / 8) steps = n / 8; /* an 8-byte load of the last six must stay inside */
    for (Py_ssize_t p = 0; p < steps; p++) {
        uint64_t w, values = 0;
        memcpy(&w, in + 6 * p, 8);
        for (int j = 0; j < 8; j++) values |= ((w >> (6 * j)) & 63) << (8 * j);
        memcpy(out + 8 * p, &values, 8);
    }
    Py_ssize_t groups = n / 4;
    for (Py_ssize_t g = 2 * steps; g < groups; g++) {
        const uint8_t *b = in + 3 * g;
        uint32_t w = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16;
        out[4 * g] = (uint8_t)(w & 63);
        out[4 * g + 1] = (uint8_t)((w >> 6) & 63);
        out[4 * g + 2] = (uint8_t)((w >> 12) & 63);
        out[4 * g + 3] = (uint8_t)(w >> 18);
    }
    Py_ssize_t tail = n - 4 * groups;
    if (!tail) return 0;
    uint32_t w = 0;
    for (Py_ssize_t j = 0; j < (6 * tail + 7) / 8; j++) w |= (uint32_t)in[3 * groups + j] << (8 * j);
    for (Py_ssize_t j = 0; j < tail; j++) out[4 * groups + j] = (uint8_t)((w >> (6 * j)) & 63);
    return (w >> (6 * tail)) != 0;
}

/* pack6(values, out): `out` must hold exactly packed6_size(len(values)) bytes. */
static PyObject *pack6(PyObject *self, PyObject *args) {
    Py_buffer in, out;
    if (!PyArg_ParseTuple(args, "y*w*", &in, &out)) return NULL;
    PyObject *result = NULL;
    if (out.len != packed6_size(in.len)) {
        PyErr_Format(PyExc_ValueError, "6-bit packing of %zd values takes %zd bytes, not %zd",
                     in.len, packed6_size(in.len), out.len);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    pack6_kernel(in.buf, in.len, out.buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return result;
}

/* unpack6(packed, out): inverse of pack6; ValueError on a wrong size or set padding. */
static PyObject *unpack6(PyObject *self, PyObject *args) {
    Py_buffer in, out;
    if (!PyArg_ParseTuple(args, "y*w*", &in, &out)) return NULL;
    PyObject *result = NULL;
    int bad = 0;
    if (in.len != packed6_size(out.len)) {
        PyErr_Format(PyExc_ValueError, "packed plane B holds %zd bytes, %zd values take %zd",
                     in.len, out.len, packed6_size(out.len));
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    bad = unpack6_kernel(in.buf, out.len, out.buf);
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "packed plane B has non-zero padding bits");
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return result;
}

/* Buffers taken from a sequence argument, released together. */
typedef struct {
    Py_buffer views[MAX_WIDTH];
    Py_ssize_t count;
} BufferList;

static void release_list(BufferList *list) {
    for (Py_ssize_t i = 0; i < list->count; i++) PyBuffer_Release(&list->views[i]);
    list->count = 0;
}

/* Fill `list` with exactly `expected` contiguous buffers of `size` bytes each. */
static int take_list(PyObject *seq, BufferList *list, Py_ssize_t expected, Py_ssize_t size,
                     int writable, const char *what) {
    list->count = 0;
    PyObject *fast = PySequence_Fast(seq, "expected a sequence of buffers");
    if (fast == NULL) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n != expected || n > MAX_WIDTH) {
        PyErr_Format(PyExc_ValueError, "%s: %zd buffers, expected %zd", what, n, expected);
        Py_DECREF(fast);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int flags = writable ? PyBUF_WRITABLE : PyBUF_SIMPLE;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &list->views[i], flags) < 0) {
            release_list(list);
            Py_DECREF(fast);
            return -1;
        }
        list->count++;
        if (list->views[i].len != size) {
            PyErr_Format(PyExc_ValueError, "%s %zd holds %zd bytes, expected %zd", what, i,
                         list->views[i].len, size);
            release_list(list);
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    return 0;
}

/* The element count of a `len`-byte chunk of `width`-byte floats, or -1 with an error set:
 * width 2, 4 or 8, a whole number of elements, and, with `joint`, the joint bit count
 * `k` that width is coded with (_codec._JOINT_BITS). */
static Py_ssize_t element_count(Py_ssize_t len, int width, int joint, int k) {
    if (width != 2 && width != 4 && width != 8) {
        PyErr_Format(PyExc_ValueError, "element width must be 2, 4 or 8, not %d", width);
        return -1;
    }
    if (joint && k != 2 && !(width == 2 && k == 4)) {
        PyErr_Format(PyExc_ValueError, "width %d is coded with %s joint bits, not %d", width,
                     width == 2 ? "2 or 4" : "2", k);
        return -1;
    }
    if (len % width) {
        PyErr_Format(PyExc_ValueError, "%zd bytes are not whole elements of %d", len, width);
        return -1;
    }
    return len / width;
}

static Py_ssize_t plane_b_size(Py_ssize_t n, int k) { return k == 4 ? (n + 1) / 2 : n; }

/* split_joint(src, width, k, lo, plane_a, plane_b, rest, escapes) -> escape count */
static PyObject *split_joint(PyObject *self, PyObject *args) {
    Py_buffer src, a, b, esc;
    int width, k, lo;
    PyObject *rest_seq;
    if (!PyArg_ParseTuple(args, "y*iiiw*w*Ow*", &src, &width, &k, &lo, &a, &b, &rest_seq, &esc))
        return NULL;
    BufferList rest = {.count = 0};
    PyObject *result = NULL;
    Py_ssize_t n = element_count(src.len, width, 1, k);
    if (n < 0) goto done;
    if (a.len != n || b.len != plane_b_size(n, k) || esc.len != n) {
        PyErr_SetString(PyExc_ValueError, "plane buffers do not match the element count");
        goto done;
    }
    if (take_list(rest_seq, &rest, width - 2, n, 1, "rest plane") < 0) goto done;

    uint8_t *planes[MAX_WIDTH];
    for (int j = 0; j < width - 2; j++) planes[j] = rest.views[j].buf;
    Py_ssize_t escapes = 0;
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *in = src.buf;
    uint8_t *pa = a.buf, *pb = b.buf, *pe = esc.buf;
    unsigned ulo = (unsigned)lo & 0xFF;
    if (width == 2 && k == 4) escapes = split_2j4(in, n, ulo, pa, pb, pe);
    else if (width == 2) escapes = split_2j2(in, n, ulo, pa, pb, pe);
    else if (width == 4) escapes = split_4j2(in, n, ulo, pa, pb, planes[0], planes[1], pe);
    else escapes = split_8j2(in, n, ulo, pa, pb, planes, pe);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(escapes);
done:
    release_list(&rest);
    PyBuffer_Release(&src);
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    PyBuffer_Release(&esc);
    return result;
}

/* split_planes(src, width, planes): rotated byte planes, most significant first. */
static PyObject *split_planes(PyObject *self, PyObject *args) {
    Py_buffer src;
    int width;
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "y*iO", &src, &width, &seq)) return NULL;
    BufferList out = {.count = 0};
    PyObject *result = NULL;
    Py_ssize_t n = element_count(src.len, width, 0, 0);
    if (n < 0) goto done;
    if (take_list(seq, &out, width, n, 1, "plane") < 0) goto done;
    uint8_t *planes[MAX_WIDTH];
    for (int j = 0; j < width; j++) planes[j] = out.views[j].buf;
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *in = src.buf;
    if (width == 2) split_planes_kernel(in, n, 2, planes);
    else if (width == 4) split_planes_kernel(in, n, 4, planes);
    else split_planes_kernel(in, n, 8, planes);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release_list(&out);
    PyBuffer_Release(&src);
    return result;
}

/* How many plane A bytes carry the escape code: the top code, so `byte >= window << k`
 * (an unsigned byte compare that vectorises), counted in byte lanes 255 at a time. */
CLONES static Py_ssize_t count_escape_codes(const uint8_t *restrict pa, Py_ssize_t n,
                                            unsigned threshold) {
    Py_ssize_t count = 0;
    for (Py_ssize_t start = 0; start < n; start += 255) {
        Py_ssize_t end = n - start < 255 ? n : start + 255;
        uint8_t lane = 0;
        for (Py_ssize_t i = start; i < end; i++) lane += pa[i] >= threshold;
        count += lane;
    }
    return count;
}

/* count_escapes(plane_a, k) -> how many elements carry the escape code. */
static PyObject *count_escapes(PyObject *self, PyObject *args) {
    Py_buffer a;
    int k;
    if (!PyArg_ParseTuple(args, "y*i", &a, &k)) return NULL;
    if (k < 1 || k > 7) {
        PyBuffer_Release(&a);
        PyErr_Format(PyExc_ValueError, "joint bits must be 1..7, not %d", k);
        return NULL;
    }
    Py_ssize_t count = 0;
    Py_BEGIN_ALLOW_THREADS
    const unsigned window = (1u << (8 - k)) - 1;
    count = count_escape_codes(a.buf, a.len, window << k);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&a);
    return PyLong_FromSsize_t(count);
}

/* The encoder's choices (exponent window, noise planes, uniform plane B) rest on
 * histograms of every `stride`-th byte; np.bincount took a third of bf16 encoding there
 * (it casts its input to a fresh intp array first). Four tables, so that runs of one
 * value (the exponent plane) do not wait on the same counter. */
CLONES static void strided_histogram(const uint8_t *restrict p, Py_ssize_t count,
                                     Py_ssize_t stride, int width, uint32_t *restrict out) {
    uint32_t t[4][256];
    memset(t, 0, sizeof t);
    Py_ssize_t i = 0;
#define SAMPLE(j) (width ? top_byte(p + (j) * stride, width) : p[(j) * stride])
    for (; i + 4 <= count; i += 4) {
        t[0][SAMPLE(i)]++;
        t[1][SAMPLE(i + 1)]++;
        t[2][SAMPLE(i + 2)]++;
        t[3][SAMPLE(i + 3)]++;
    }
    for (; i < count; i++) t[0][SAMPLE(i)]++;
#undef SAMPLE
    for (int v = 0; v < 256; v++) out[v] = t[0][v] + t[1][v] + t[2][v] + t[3][v];
}

/* sampled_bits(plane, stride) -> order-0 entropy in bits per byte of plane[::stride].
 * Summed in value order with one rounding per step (setup.py turns off FMA contraction),
 * exactly as _codec's fallback does it, so both backends make the same choices. */
static PyObject *sampled_bits(PyObject *self, PyObject *args) {
    Py_buffer in;
    Py_ssize_t stride;
    if (!PyArg_ParseTuple(args, "y*n", &in, &stride)) return NULL;
    if (stride < 1) {
        PyBuffer_Release(&in);
        PyErr_SetString(PyExc_ValueError, "stride must be positive");
        return NULL;
    }
    uint32_t hist[256];
    Py_ssize_t count = (in.len + stride - 1) / stride;
    double bits = 0.0;
    Py_BEGIN_ALLOW_THREADS
    strided_histogram(in.buf, count, stride, 0, hist);
    for (int v = 0; v < 256; v++) {
        if (!hist[v]) continue;
        double q = (double)hist[v] / (double)count;
        bits -= q * log2(q);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&in);
    return PyFloat_FromDouble(bits);
}

/* top_histogram(src, width, stride, counts): counts[v] (256 int64) = how many of every
 * stride-th element have rotated top byte v (what the exponent window is chosen from). */
static PyObject *top_histogram(PyObject *self, PyObject *args) {
    Py_buffer src, out;
    int width;
    Py_ssize_t stride;
    if (!PyArg_ParseTuple(args, "y*inw*", &src, &width, &stride, &out)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = element_count(src.len, width, 0, 0);
    if (n < 0) goto done;
    if (stride < 1 || out.len != 256 * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "need a positive stride and 256 int64 counts");
        goto done;
    }
    uint32_t hist[256];
    Py_BEGIN_ALLOW_THREADS
    strided_histogram(src.buf, (n + stride - 1) / stride, stride * width, width, hist);
    int64_t *counts = out.buf;
    for (int v = 0; v < 256; v++) counts[v] = hist[v];
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

/* merge_joint(out, width, k, lo, plane_a, plane_b, rest, escapes): inverse of split_joint.
 * Raises ValueError when plane B has bits above its width, a padding nibble is set, or
 * the escapes do not match the escape codes one for one. */
static PyObject *merge_joint(PyObject *self, PyObject *args) {
    Py_buffer out, a, b, esc;
    int width, k, lo;
    PyObject *rest_seq;
    int packed = 0;
    if (!PyArg_ParseTuple(args, "w*iiiy*y*Oy*|p", &out, &width, &k, &lo, &a, &b, &rest_seq,
                          &esc, &packed))
        return NULL;
    BufferList rest = {.count = 0};
    PyObject *result = NULL;
    Py_ssize_t n = element_count(out.len, width, 1, k);
    if (n < 0) goto done;
    if (packed && !(width <= 4 && k == 2)) {
        PyErr_SetString(PyExc_ValueError, "a packed plane B is merged here for bg2j2p, bg4j2p");
        goto done;
    }
    if (a.len != n || b.len != (packed ? packed6_size(n) : plane_b_size(n, k))) {
        PyErr_SetString(PyExc_ValueError, "plane buffers do not match the element count");
        goto done;
    }
    if (take_list(rest_seq, &rest, width - 2, n, 0, "rest plane") < 0) goto done;

    int bad_b = 0;
    Py_ssize_t used = 0;
    const uint8_t *planes[MAX_WIDTH];
    for (int j = 0; j < width - 2; j++) planes[j] = rest.views[j].buf;
    Py_BEGIN_ALLOW_THREADS
    uint8_t *dst = out.buf;
    const uint8_t *pa = a.buf, *pb = b.buf, *pe = esc.buf;
    const Py_ssize_t n_esc = esc.len;
    unsigned high_bits = 0;
    if (packed) {
        /* the 6-bit values cannot exceed their width; padding is checked in the merge */
    } else if (k == 4) {
        if (n & 1) high_bits = pb[n >> 1] >> 4; /* the padding nibble must be zero */
    } else {
        for (Py_ssize_t i = 0; i < n; i++) high_bits |= pb[i];
        high_bits >>= (8 - k);
    }
    unsigned ulo = (unsigned)lo & 0xFF;
    if (high_bits) bad_b = 1;
    else if (packed) {
        used = width == 2 ? merge_2j2p(dst, n, ulo, pa, pb, b.len, pe, n_esc)
                          : merge_4j2p(dst, n, ulo, pa, pb, b.len, planes[0], planes[1], pe,
                                       n_esc);
        if (used < 0) bad_b = 2;
    } else if (width == 2 && k == 4) used = merge_2j4(dst, n, ulo, pa, pb, pe, n_esc);
    else if (width == 2) used = merge_2j2(dst, n, ulo, pa, pb, pe, n_esc);
    else if (width == 4) used = merge_4j2(dst, n, ulo, pa, pb, planes[0], planes[1], pe, n_esc);
    else used = merge_8j2(dst, n, ulo, pa, pb, planes, pe, n_esc);
    Py_END_ALLOW_THREADS
    if (bad_b) {
        PyErr_SetString(PyExc_ValueError,
                        bad_b == 2 ? "packed plane B has non-zero padding bits"
                        : k == 4   ? "nibble plane has a non-zero padding nibble"
                               : "plane B has bits set above its width");
        goto done;
    }
    if (used > esc.len) {
        PyErr_Format(PyExc_ValueError, "the escape codes need more than the %zd escaped bytes",
                     esc.len);
        goto done;
    }
    if (used != esc.len) {
        PyErr_Format(PyExc_ValueError, "escape stream holds %zd bytes, the codes use %zd",
                     esc.len, used);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    release_list(&rest);
    PyBuffer_Release(&out);
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    PyBuffer_Release(&esc);
    return result;
}

/* merge_planes(out, width, planes): inverse of split_planes. */
static PyObject *merge_planes(PyObject *self, PyObject *args) {
    Py_buffer out;
    int width;
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "w*iO", &out, &width, &seq)) return NULL;
    BufferList in = {.count = 0};
    PyObject *result = NULL;
    Py_ssize_t n = element_count(out.len, width, 0, 0);
    if (n < 0) goto done;
    if (take_list(seq, &in, width, n, 0, "plane") < 0) goto done;
    const uint8_t *planes[MAX_WIDTH];
    for (int j = 0; j < width; j++) planes[j] = in.views[j].buf;
    Py_BEGIN_ALLOW_THREADS
    uint8_t *dst = out.buf;
    if (width == 2) merge_planes_kernel(dst, n, 2, planes);
    else if (width == 4) merge_planes_kernel(dst, n, 4, planes);
    else merge_planes_kernel(dst, n, 8, planes);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release_list(&in);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"split_joint", split_joint, METH_VARARGS,
     "split_joint(src, width, k, lo, plane_a, plane_b, rest, escapes) -> escape count"},
    {"split_planes", split_planes, METH_VARARGS, "split_planes(src, width, planes)"},
    {"count_escapes", count_escapes, METH_VARARGS, "count_escapes(plane_a, k) -> int"},
    {"merge_joint", merge_joint, METH_VARARGS,
     "merge_joint(out, width, k, lo, plane_a, plane_b, rest, escapes, packed=False)"},
    {"merge_planes", merge_planes, METH_VARARGS, "merge_planes(out, width, planes)"},
    {"pack6", pack6, METH_VARARGS, "pack6(values, out): 6-bit values, four to three bytes"},
    {"unpack6", unpack6, METH_VARARGS, "unpack6(packed, out): inverse of pack6"},
    {"sampled_bits", sampled_bits, METH_VARARGS,
     "sampled_bits(plane, stride) -> entropy of every stride-th byte, bits per byte"},
    {"top_histogram", top_histogram, METH_VARARGS,
     "top_histogram(src, width, stride, counts): rotated top bytes of every stride-th element"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_grouping",
    "Byte grouping of float chunks in one pass (see _codec.py for the format).", -1, methods,
};

PyMODINIT_FUNC PyInit__grouping(void) {
    const uint16_t probe = 1;
    if (*(const uint8_t *)&probe != 1) {
        /* The words are loaded with memcpy; on a big-endian host _codec uses numpy. */
        PyErr_SetString(PyExc_ImportError, "ckptstore._grouping needs a little-endian host");
        return NULL;
    }
    return PyModule_Create(&module);
}
