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
#include <string.h>

#define MAX_WIDTH 8

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

/* The loops below are written once and inlined with constant width at each call site,
 * so that the compiler unrolls the per-byte work (a generic loop ran at half the speed of
 * numpy). */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* The joint variants are bg2j4, bg4j2 and bg8j2 (_codec._JOINT_BITS); each has its own
 * loop so that the element is a native integer and the main pass has no branch: codes
 * are clamped to the escape code there, and a second pass, run only when some top byte
 * fell outside the window, collects the escaped bytes in order. Plain loops like these
 * are what gcc -O3 vectorises. */

/* AVX2 where the CPU has it, chosen at load time (gcc/clang on glibc); the baseline
 * build elsewhere. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

#define ROTL(T, x) ((T)(((x) << 1) | ((x) >> (8 * sizeof(T) - 1))))
#define ROTR(T, x) ((T)(((x) >> 1) | ((x) << (8 * sizeof(T) - 1))))

/* Pass 2 of a split: the top bytes outside the window, in element order. */
#define COLLECT_ESCAPES(T, BITS, WINDOW)                                     \
    Py_ssize_t escapes = 0;                                                  \
    if (outside)                                                             \
        for (Py_ssize_t i = 0; i < n; i++) {                                 \
            T x;                                                             \
            memcpy(&x, in + i * sizeof(T), sizeof(T));                       \
            unsigned top = (unsigned)(ROTL(T, x) >> (BITS - 8)) & 0xFF;      \
            if (((top - lo) & 0xFF) >= (WINDOW)) pe[escapes++] = (uint8_t)top; \
        }                                                                    \
    return escapes;

/* One bf16/fp16 element of split_2j4: its plane A byte; its low nibble in *low. */
ALWAYS_INLINE uint8_t code_2j4(const uint8_t *p, unsigned lo, unsigned *outside,
                               unsigned *low) {
    uint16_t x;
    memcpy(&x, p, 2);
    uint16_t w = ROTL(uint16_t, x);
    unsigned code = ((unsigned)(w >> 8) - lo) & 0xFF;
    *outside |= code >= 15;
    code = code < 15 ? code : 15;
    *low = w & 0xF;
    return (uint8_t)((code << 4) | ((w & 0xFF) >> 4));
}

CLONES static Py_ssize_t split_2j4(const uint8_t *restrict in, Py_ssize_t n, unsigned lo,
                                   uint8_t *restrict pa, uint8_t *restrict pb,
                                   uint8_t *restrict pe) {
    unsigned outside = 0, low0, low1;
    for (Py_ssize_t m = 0; m < n / 2; m++) { /* nibbles: the even element in the low half */
        pa[2 * m] = code_2j4(in + 4 * m, lo, &outside, &low0);
        pa[2 * m + 1] = code_2j4(in + 4 * m + 2, lo, &outside, &low1);
        pb[m] = (uint8_t)(low0 | (low1 << 4));
    }
    if (n & 1) {
        pa[n - 1] = code_2j4(in + 2 * (n - 1), lo, &outside, &low0);
        pb[n / 2] = (uint8_t)low0;
    }
    COLLECT_ESCAPES(uint16_t, 16, 15)
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
    COLLECT_ESCAPES(uint32_t, 32, 63)
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
    COLLECT_ESCAPES(uint64_t, 64, 63)
}

/* Pass 2 of a merge: put the escaped top bytes back. Returns the escapes used, or
 * n_esc + 1 when the codes need more than there are. */
#define RESTORE_ESCAPES(T, BITS, K)                                                  \
    Py_ssize_t used = 0;                                                             \
    if (n_esc == 0) { /* the common case: only check that no code asks for one */     \
        unsigned any = 0;                                                            \
        for (Py_ssize_t i = 0; i < n; i++) any |= (pa[i] >> (K)) == (1u << (8 - (K))) - 1; \
        return any ? 1 : 0;                                                          \
    }                                                                                \
    for (Py_ssize_t i = 0; i < n; i++) {                                             \
        if ((pa[i] >> (K)) != (1u << (8 - (K))) - 1) continue;                        \
        if (used == n_esc) return n_esc + 1;                                         \
        T x;                                                                         \
        memcpy(&x, dst + i * sizeof(T), sizeof(T));                                  \
        T w = ROTL(T, x);                                                            \
        w = (T)((w & (((T)1 << (BITS - 8)) - 1)) | ((T)pe[used++] << (BITS - 8)));  \
        x = ROTR(T, w);                                                              \
        memcpy(dst + i * sizeof(T), &x, sizeof(T));                                  \
    }                                                                                \
    return used;

CLONES static Py_ssize_t merge_2j4(uint8_t *restrict dst, Py_ssize_t n, unsigned lo,
                                   const uint8_t *restrict pa, const uint8_t *restrict pb,
                                   const uint8_t *restrict pe, Py_ssize_t n_esc) {
    for (Py_ssize_t m = 0; m < n / 2; m++) { /* two elements per nibble byte */
        unsigned a0 = pa[2 * m], a1 = pa[2 * m + 1], b = pb[m];
        uint16_t w0 = (uint16_t)((((a0 >> 4) + lo) & 0xFF) << 8 | (((a0 << 4) | (b & 0xF)) & 0xFF));
        uint16_t w1 = (uint16_t)((((a1 >> 4) + lo) & 0xFF) << 8 | (((a1 << 4) | (b >> 4)) & 0xFF));
        uint16_t x0 = ROTR(uint16_t, w0), x1 = ROTR(uint16_t, w1);
        memcpy(dst + 4 * m, &x0, 2);
        memcpy(dst + 4 * m + 2, &x1, 2);
    }
    if (n & 1) {
        unsigned a = pa[n - 1], b = pb[n / 2];
        uint16_t w = (uint16_t)((((a >> 4) + lo) & 0xFF) << 8 | (((a << 4) | (b & 0xF)) & 0xFF));
        uint16_t x = ROTR(uint16_t, w);
        memcpy(dst + 2 * (n - 1), &x, 2);
    }
    RESTORE_ESCAPES(uint16_t, 16, 4)
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
    if (joint && k != (width == 2 ? 4 : 2)) {
        PyErr_Format(PyExc_ValueError, "width %d is coded with %d joint bits, not %d", width,
                     width == 2 ? 4 : 2, k);
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
    if (width == 2) escapes = split_2j4(in, n, ulo, pa, pb, pe);
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
    const uint8_t *pa = a.buf;
    const unsigned window = (1u << (8 - k)) - 1;
    for (Py_ssize_t i = 0; i < a.len; i++) count += ((unsigned)pa[i] >> k) == window;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&a);
    return PyLong_FromSsize_t(count);
}

/* merge_joint(out, width, k, lo, plane_a, plane_b, rest, escapes): inverse of split_joint.
 * Raises ValueError when plane B has bits above its width, a padding nibble is set, or
 * the escapes do not match the escape codes one for one. */
static PyObject *merge_joint(PyObject *self, PyObject *args) {
    Py_buffer out, a, b, esc;
    int width, k, lo;
    PyObject *rest_seq;
    if (!PyArg_ParseTuple(args, "w*iiiy*y*Oy*", &out, &width, &k, &lo, &a, &b, &rest_seq, &esc))
        return NULL;
    BufferList rest = {.count = 0};
    PyObject *result = NULL;
    Py_ssize_t n = element_count(out.len, width, 1, k);
    if (n < 0) goto done;
    if (a.len != n || b.len != plane_b_size(n, k)) {
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
    if (k == 4) {
        if (n & 1) high_bits = pb[n >> 1] >> 4; /* the padding nibble must be zero */
    } else {
        for (Py_ssize_t i = 0; i < n; i++) high_bits |= pb[i];
        high_bits >>= (8 - k);
    }
    unsigned ulo = (unsigned)lo & 0xFF;
    if (high_bits) bad_b = 1;
    else if (width == 2) used = merge_2j4(dst, n, ulo, pa, pb, pe, n_esc);
    else if (width == 4) used = merge_4j2(dst, n, ulo, pa, pb, planes[0], planes[1], pe, n_esc);
    else used = merge_8j2(dst, n, ulo, pa, pb, planes, pe, n_esc);
    Py_END_ALLOW_THREADS
    if (bad_b) {
        PyErr_SetString(PyExc_ValueError,
                        k == 4 ? "nibble plane has a non-zero padding nibble"
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
     "merge_joint(out, width, k, lo, plane_a, plane_b, rest, escapes)"},
    {"merge_planes", merge_planes, METH_VARARGS, "merge_planes(out, width, planes)"},
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
