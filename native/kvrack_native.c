/*
 * kvrack._native: primitives on mapped memory that Python cannot express.
 *
 * copy / nt_store / nt_load: bounds-checked copies between any two buffers
 * (mmap, numpy, bytearray, ...), plain or non-temporal, releasing the GIL for
 * large copies. flush / invalidate: write back (and drop) the cache lines of a
 * range, with the best instruction this CPU has, chosen once at import.
 * Fences, and 64-bit atomics on mapped memory. CXL memory shared between hosts
 * is not cache-coherent, so the CXL tier is built from exactly these.
 */
#include "kvrack_native.h"

#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define KV_X86 1
#endif

/* ---- cache-line maintenance, chosen at import ------------------------------------------- */

static int has_clflush, has_clflushopt, has_clwb, has_sse2, has_sse41, has_avx2;
static const char *flush_name = "none", *invalidate_name = "none";

#define LINE_LOOP(p, n, INSN)                                                          \
    do {                                                                               \
        uintptr_t a_ = (uintptr_t)(p) & ~(uintptr_t)(KV_LINE - 1);                    \
        uintptr_t e_ = (uintptr_t)(p) + (n);                                           \
        for (; a_ < e_; a_ += KV_LINE) __asm__ __volatile__(INSN " (%0)" ::"r"(a_) : "memory"); \
    } while (0)

#ifdef KV_X86
static void flush_clwb(const void *p, size_t n) { if (n) LINE_LOOP(p, n, "clwb"); }
static void flush_clflushopt(const void *p, size_t n) { if (n) LINE_LOOP(p, n, "clflushopt"); }
static void flush_clflush(const void *p, size_t n) { if (n) LINE_LOOP(p, n, "clflush"); }
#endif
static void flush_none(const void *p, size_t n) { (void)p; (void)n; __atomic_thread_fence(__ATOMIC_SEQ_CST); }

void (*kv_flush_range)(const void *p, size_t n) = flush_none;
void (*kv_invalidate_range)(const void *p, size_t n) = flush_none;

static void detect_cpu(void) {
#ifdef KV_X86
    unsigned int a, b, c, d;
    if (__get_cpuid(1, &a, &b, &c, &d)) {
        has_clflush = (d >> 19) & 1;
        has_sse2 = (d >> 26) & 1;
        has_sse41 = (c >> 19) & 1;
    }
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        has_clflushopt = (b >> 23) & 1;
        has_clwb = (b >> 24) & 1;
        has_avx2 = (b >> 5) & 1;
    }
    /* clwb keeps the line cached (good after writes); invalidation needs the line gone */
    if (has_clflushopt) {
        kv_invalidate_range = flush_clflushopt;
        invalidate_name = "clflushopt";
    } else if (has_clflush) {
        kv_invalidate_range = flush_clflush;
        invalidate_name = "clflush";
    }
    if (has_clwb) {
        kv_flush_range = flush_clwb;
        flush_name = "clwb";
    } else {
        kv_flush_range = kv_invalidate_range;
        flush_name = invalidate_name;
    }
#endif
}

/* ---- non-temporal copies ------------------------------------------------------------------ */

#ifdef KV_X86
__attribute__((target("avx2"))) static void nt_store_avx2(char *d, const char *s, size_t n) {
    for (; n >= 128; n -= 128, d += 128, s += 128) {
        __m256i v0 = _mm256_loadu_si256((const __m256i *)s), v1 = _mm256_loadu_si256((const __m256i *)(s + 32));
        __m256i v2 = _mm256_loadu_si256((const __m256i *)(s + 64)), v3 = _mm256_loadu_si256((const __m256i *)(s + 96));
        _mm256_stream_si256((__m256i *)d, v0);
        _mm256_stream_si256((__m256i *)(d + 32), v1);
        _mm256_stream_si256((__m256i *)(d + 64), v2);
        _mm256_stream_si256((__m256i *)(d + 96), v3);
    }
    for (; n >= 32; n -= 32, d += 32, s += 32) _mm256_stream_si256((__m256i *)d, _mm256_loadu_si256((const __m256i *)s));
}

static void nt_store_sse2(char *d, const char *s, size_t n) {
    for (; n >= 16; n -= 16, d += 16, s += 16) _mm_stream_si128((__m128i *)d, _mm_loadu_si128((const __m128i *)s));
}

__attribute__((target("avx2"))) static void nt_load_avx2(char *d, const char *s, size_t n) {
    for (; n >= 128; n -= 128, d += 128, s += 128) {
        __m256i v0 = _mm256_stream_load_si256((const __m256i *)s), v1 = _mm256_stream_load_si256((const __m256i *)(s + 32));
        __m256i v2 = _mm256_stream_load_si256((const __m256i *)(s + 64)), v3 = _mm256_stream_load_si256((const __m256i *)(s + 96));
        _mm256_storeu_si256((__m256i *)d, v0);
        _mm256_storeu_si256((__m256i *)(d + 32), v1);
        _mm256_storeu_si256((__m256i *)(d + 64), v2);
        _mm256_storeu_si256((__m256i *)(d + 96), v3);
    }
    for (; n >= 32; n -= 32, d += 32, s += 32) _mm256_storeu_si256((__m256i *)d, _mm256_stream_load_si256((const __m256i *)s));
}

__attribute__((target("sse4.1"))) static void nt_load_sse41(char *d, const char *s, size_t n) {
    for (; n >= 16; n -= 16, d += 16, s += 16) _mm_storeu_si128((__m128i *)d, _mm_stream_load_si128((__m128i *)s));
}
#endif

/* Non-temporal stores need an aligned destination: the unaligned head and tail go through
 * the cache and are written back with a flush, so the whole range reaches memory. */
void kv_nt_store_copy(void *dst, const void *src, size_t n) {
    char *d = dst;
    const char *s = src;
#ifdef KV_X86
    size_t align = has_avx2 ? 32 : 16;
    size_t head = (align - ((uintptr_t)d & (align - 1))) & (align - 1);
    if (has_sse2 && n >= head + align) {
        if (head) {
            memcpy(d, s, head);
            kv_flush_range(d, head);
            d += head, s += head, n -= head;
        }
        size_t body = n & ~(align - 1);
        if (has_avx2) nt_store_avx2(d, s, body);
        else nt_store_sse2(d, s, body);
        d += body, s += body, n -= body;
    }
    if (n) {
        memcpy(d, s, n);
        kv_flush_range(d, n);
    }
    kv_sfence();
#else
    memcpy(d, s, n);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

/* Streaming loads need an aligned source; they bypass the cache only on write-combining
 * mappings (a devdax device mapped WC), elsewhere they are ordinary loads. */
void kv_nt_load_copy(void *dst, const void *src, size_t n) {
    char *d = dst;
    const char *s = src;
#ifdef KV_X86
    kv_mfence();
    size_t align = has_avx2 ? 32 : 16;
    size_t head = (align - ((uintptr_t)s & (align - 1))) & (align - 1);
    if (has_sse41 && n >= head + align) {
        memcpy(d, s, head);
        d += head, s += head, n -= head;
        size_t body = n & ~(align - 1);
        if (has_avx2) nt_load_avx2(d, s, body);
        else nt_load_sse41(d, s, body);
        d += body, s += body, n -= body;
    }
    memcpy(d, s, n);
    kv_lfence();
#else
    memcpy(d, s, n);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

/* ---- argument checks --------------------------------------------------------------------- */

int kv_check_range(const char *fn, const char *what, Py_ssize_t len, Py_ssize_t off, Py_ssize_t n) {
    if (off < 0 || n < 0) {
        PyErr_Format(PyExc_ValueError, "%s: offsets and length must be >= 0", fn);
        return -1;
    }
    if (off > len || n > len - off) {
        PyErr_Format(PyExc_ValueError, "%s: %s range [%zd, %zd) is outside its %zd bytes", fn, what, off, off + n, len);
        return -1;
    }
    return 0;
}

static uint64_t *word_at(const char *fn, Py_buffer *b, Py_ssize_t off) {
    if (kv_check_range(fn, "word", b->len, off, 8) < 0) return NULL;
    uintptr_t p = (uintptr_t)b->buf + (uintptr_t)off;
    if (p & 7) {
        PyErr_Format(PyExc_ValueError, "%s: offset %zd is not 8-byte aligned in memory", fn, off);
        return NULL;
    }
    return (uint64_t *)p;
}

/* ---- copies ------------------------------------------------------------------------------ */

enum copy_kind { COPY_PLAIN, COPY_NT_STORE, COPY_NT_LOAD };

static PyObject *do_copy(PyObject *args, const char *fmt, const char *fn, enum copy_kind kind) {
    Py_buffer dst, src;
    Py_ssize_t dst_off, src_off, n;
    if (!PyArg_ParseTuple(args, fmt, &dst, &dst_off, &src, &src_off, &n)) return NULL;
    PyObject *ret = NULL;
    if (kv_check_range(fn, "destination", dst.len, dst_off, n) == 0 &&
        kv_check_range(fn, "source", src.len, src_off, n) == 0) {
        char *d = (char *)dst.buf + dst_off;
        const char *s = (const char *)src.buf + src_off;
        int release = n >= KV_GIL_RELEASE_BYTES;
        PyThreadState *ts = release ? PyEval_SaveThread() : NULL;
        if (kind == COPY_NT_STORE) kv_nt_store_copy(d, s, (size_t)n);
        else if (kind == COPY_NT_LOAD) kv_nt_load_copy(d, s, (size_t)n);
        else memmove(d, s, (size_t)n);
        if (release) PyEval_RestoreThread(ts);
        ret = PyLong_FromSsize_t(n);
    }
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    return ret;
}

static PyObject *native_copy(PyObject *self, PyObject *args) {
    return do_copy(args, "w*ny*nn:copy", "copy", COPY_PLAIN);
}

static PyObject *native_nt_store(PyObject *self, PyObject *args) {
    return do_copy(args, "w*ny*nn:nt_store", "nt_store", COPY_NT_STORE);
}

static PyObject *native_nt_load(PyObject *self, PyObject *args) {
    return do_copy(args, "w*ny*nn:nt_load", "nt_load", COPY_NT_LOAD);
}

/* ---- flush / invalidate / fences --------------------------------------------------------- */

static PyObject *line_op(PyObject *args, const char *fmt, const char *fn, void (*op)(const void *, size_t)) {
    Py_buffer b;
    Py_ssize_t off, n;
    if (!PyArg_ParseTuple(args, fmt, &b, &off, &n)) return NULL;
    PyObject *ret = NULL;
    if (kv_check_range(fn, "buffer", b.len, off, n) == 0) {
        int release = n >= KV_GIL_RELEASE_BYTES;
        PyThreadState *ts = release ? PyEval_SaveThread() : NULL;
        op((const char *)b.buf + off, (size_t)n);
        kv_mfence();
        if (release) PyEval_RestoreThread(ts);
        Py_INCREF(Py_None);
        ret = Py_None;
    }
    PyBuffer_Release(&b);
    return ret;
}

static PyObject *native_flush(PyObject *self, PyObject *args) {
    return line_op(args, "y*nn:flush", "flush", kv_flush_range);
}

static PyObject *native_invalidate(PyObject *self, PyObject *args) {
    return line_op(args, "y*nn:invalidate", "invalidate", kv_invalidate_range);
}

static PyObject *native_store_fence(PyObject *self, PyObject *noargs) { kv_sfence(); Py_RETURN_NONE; }
static PyObject *native_load_fence(PyObject *self, PyObject *noargs) { kv_lfence(); Py_RETURN_NONE; }
static PyObject *native_full_fence(PyObject *self, PyObject *noargs) { kv_mfence(); Py_RETURN_NONE; }

/* ---- 64-bit atomics ---------------------------------------------------------------------- */

static PyObject *native_load64(PyObject *self, PyObject *args) {
    Py_buffer b;
    Py_ssize_t off;
    if (!PyArg_ParseTuple(args, "y*n:load64", &b, &off)) return NULL;
    uint64_t *w = word_at("load64", &b, off);
    PyObject *ret = w ? PyLong_FromUnsignedLongLong(__atomic_load_n(w, __ATOMIC_ACQUIRE)) : NULL;
    PyBuffer_Release(&b);
    return ret;
}

static PyObject *native_store64(PyObject *self, PyObject *args) {
    Py_buffer b;
    Py_ssize_t off;
    unsigned long long v;
    if (!PyArg_ParseTuple(args, "w*nK:store64", &b, &off, &v)) return NULL;
    uint64_t *w = word_at("store64", &b, off);
    if (w) __atomic_store_n(w, (uint64_t)v, __ATOMIC_RELEASE);
    PyBuffer_Release(&b);
    if (!w) return NULL;
    Py_RETURN_NONE;
}

static PyObject *native_cas64(PyObject *self, PyObject *args) {
    Py_buffer b;
    Py_ssize_t off;
    unsigned long long expected, desired;
    if (!PyArg_ParseTuple(args, "w*nKK:cas64", &b, &off, &expected, &desired)) return NULL;
    uint64_t *w = word_at("cas64", &b, off);
    PyObject *ret = NULL;
    if (w) {
        uint64_t seen = (uint64_t)expected;
        __atomic_compare_exchange_n(w, &seen, (uint64_t)desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
        ret = PyLong_FromUnsignedLongLong(seen); /* == expected exactly when the swap happened */
    }
    PyBuffer_Release(&b);
    return ret;
}

static PyObject *native_fetch_add64(PyObject *self, PyObject *args) {
    Py_buffer b;
    Py_ssize_t off;
    long long delta;
    if (!PyArg_ParseTuple(args, "w*nL:fetch_add64", &b, &off, &delta)) return NULL;
    uint64_t *w = word_at("fetch_add64", &b, off);
    PyObject *ret = w ? PyLong_FromUnsignedLongLong(__atomic_fetch_add(w, (uint64_t)delta, __ATOMIC_ACQ_REL)) : NULL;
    PyBuffer_Release(&b);
    return ret;
}

/* ---- reports ----------------------------------------------------------------------------- */

static PyObject *native_cpu_features(PyObject *self, PyObject *noargs) {
    return Py_BuildValue("{s:O,s:O,s:O,s:O,s:O,s:O}", "clflush", has_clflush ? Py_True : Py_False,
                         "clflushopt", has_clflushopt ? Py_True : Py_False, "clwb", has_clwb ? Py_True : Py_False,
                         "sse2", has_sse2 ? Py_True : Py_False, "sse4_1", has_sse41 ? Py_True : Py_False,
                         "avx2", has_avx2 ? Py_True : Py_False);
}

static PyObject *native_primitives(PyObject *self, PyObject *noargs) {
    return Py_BuildValue("{s:s,s:s,s:s}", "flush", flush_name, "invalidate", invalidate_name, "nt_copy",
#ifdef KV_X86
                         has_avx2 ? "avx2" : (has_sse2 ? "sse2" : "memcpy")
#else
                         "memcpy"
#endif
    );
}

/* The address of a contiguous buffer's first byte, for transfer engines (NIXL) that take addresses.
 * Valid while the caller keeps the buffer (or a view of it) alive. */
static PyObject *native_address(PyObject *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *r = PyLong_FromVoidPtr(b.buf);
    PyBuffer_Release(&b);
    return r;
}

static PyMethodDef methods[] = {
    {"address", native_address, METH_O,
     "address(buffer) -> int; where a contiguous buffer's bytes start (valid while the buffer lives)."},
    {"copy", native_copy, METH_VARARGS,
     "copy(dst, dst_offset, src, src_offset, nbytes) -> nbytes; bounds-checked, releases the GIL for large copies."},
    {"nt_store", native_nt_store, METH_VARARGS,
     "nt_store(dst, dst_offset, src, src_offset, nbytes) -> nbytes; non-temporal stores into dst, then a store fence: "
     "the bytes are in memory, not only in this CPU's cache, when it returns."},
    {"nt_load", native_nt_load, METH_VARARGS,
     "nt_load(dst, dst_offset, src, src_offset, nbytes) -> nbytes; streaming loads from src (bypass the cache on "
     "write-combining mappings), fenced."},
    {"flush", native_flush, METH_VARARGS,
     "flush(buf, offset, nbytes); write back the cache lines of the range to memory, then a full fence."},
    {"invalidate", native_invalidate, METH_VARARGS,
     "invalidate(buf, offset, nbytes); write back and drop the cache lines of the range, then a full fence, so the "
     "next loads read memory."},
    {"store_fence", native_store_fence, METH_NOARGS, "sfence: earlier stores and flushes complete before later ones."},
    {"load_fence", native_load_fence, METH_NOARGS, "lfence: earlier loads complete before later ones."},
    {"full_fence", native_full_fence, METH_NOARGS, "mfence: every earlier load, store and flush completes first."},
    {"load64", native_load64, METH_VARARGS, "load64(buf, offset) -> int; atomic acquire load of an aligned u64."},
    {"store64", native_store64, METH_VARARGS, "store64(buf, offset, value); atomic release store of an aligned u64."},
    {"cas64", native_cas64, METH_VARARGS,
     "cas64(buf, offset, expected, desired) -> the value seen; it equals expected exactly when the swap happened."},
    {"fetch_add64", native_fetch_add64, METH_VARARGS,
     "fetch_add64(buf, offset, delta) -> the value before; atomic add (wraps modulo 2**64)."},
    {"cxl_lookup", kv_cxl_lookup, METH_VARARGS,
     "cxl_lookup(region, index_offset, nslots, keys, out, invalidate) -> leading hits; probes the CXL index for "
     "each 32-byte key, writes its entry slot (or -1) into out (int64 per key)."},
    {"cxl_read", kv_cxl_read, METH_VARARGS,
     "cxl_read(region, index_offset, nslots, data_offset, chunk_bytes, key, dst, dst_offset, invalidate, retries, "
     "validated=None) -> bytes read, -1 when absent, -2 when it kept changing under the reader; a torn copy is never "
     "returned. validated (nslots + 2 uint64, this process's): the entry version each slot was last read at, so a "
     "block read again unchanged skips the data invalidation; then the counts of reads that skipped and that did it."},
    {"cxl_read_many", kv_cxl_read_many, METH_VARARGS,
     "cxl_read_many(region, index_offset, nslots, data_offset, chunk_bytes, keys, dsts, invalidate, retries, "
     "validated=None) -> [bytes read, -1 absent or -2 busy per key]; cxl_read for each 32-byte key of keys into the "
     "writable buffer of dsts at the same position, in one call that holds no GIL while it reads."},
    {"cxl_publish", kv_cxl_publish, METH_VARARGS,
     "cxl_publish(region, entry_offset, meta, key, loc, check); rewrites one index entry under its seqlock "
     "(odd version, flushed; fields, flushed; even version, flushed)."},
    {"cpu_features", native_cpu_features, METH_NOARGS, "Cache-line and SIMD features of this CPU."},
    {"primitives", native_primitives, METH_NOARGS, "The instructions flush, invalidate and nt_* use on this CPU."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "kvrack._native",
                                    "Primitives on mapped memory for kvrack.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) {
    detect_cpu();
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "GIL_RELEASE_BYTES", KV_GIL_RELEASE_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
