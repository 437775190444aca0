/*
 * kvrack._native: primitives on mapped memory that Python cannot express.
 *
 * copy(dst, dst_offset, src, src_offset, nbytes): bounds-checked memcpy between
 * any two buffers (mmap, numpy, bytearray, ...) that releases the GIL for large
 * copies, so a client's copy into a mapped segment does not stall its other
 * threads. cpu_features(): which cache-line primitives this CPU offers (the CXL
 * tier chooses its flush instruction from this at load time).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#define GIL_RELEASE_BYTES (64 * 1024)

static PyObject *native_copy(PyObject *self, PyObject *args) {
    Py_buffer dst, src;
    Py_ssize_t dst_off, src_off, n;
    if (!PyArg_ParseTuple(args, "w*ny*nn:copy", &dst, &dst_off, &src, &src_off, &n))
        return NULL;
    PyObject *ret = NULL;
    if (dst_off < 0 || src_off < 0 || n < 0) {
        PyErr_SetString(PyExc_ValueError, "copy: offsets and length must be >= 0");
    } else if (dst_off > dst.len || n > dst.len - dst_off) {
        PyErr_Format(PyExc_ValueError, "copy: destination range [%zd, %zd) is outside its %zd bytes",
                     dst_off, dst_off + n, dst.len);
    } else if (src_off > src.len || n > src.len - src_off) {
        PyErr_Format(PyExc_ValueError, "copy: source range [%zd, %zd) is outside its %zd bytes",
                     src_off, src_off + n, src.len);
    } else {
        char *d = (char *)dst.buf + dst_off;
        const char *s = (const char *)src.buf + src_off;
        if (n >= GIL_RELEASE_BYTES) {
            Py_BEGIN_ALLOW_THREADS
            memmove(d, s, (size_t)n);
            Py_END_ALLOW_THREADS
        } else {
            memmove(d, s, (size_t)n);
        }
        ret = PyLong_FromSsize_t(n);
    }
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    return ret;
}

static PyObject *native_cpu_features(PyObject *self, PyObject *noargs) {
    int clflush = 0, clflushopt = 0, clwb = 0, sse2 = 0, avx2 = 0;
#if defined(__x86_64__) || defined(__i386__)
    unsigned int a, b, c, d;
    if (__get_cpuid(1, &a, &b, &c, &d)) {
        clflush = (d >> 19) & 1;
        sse2 = (d >> 26) & 1;
    }
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        clflushopt = (b >> 23) & 1;
        clwb = (b >> 24) & 1;
        avx2 = (b >> 5) & 1;
    }
#endif
    return Py_BuildValue("{s:O,s:O,s:O,s:O,s:O}", "clflush", clflush ? Py_True : Py_False,
                         "clflushopt", clflushopt ? Py_True : Py_False, "clwb", clwb ? Py_True : Py_False,
                         "sse2", sse2 ? Py_True : Py_False, "avx2", avx2 ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"copy", native_copy, METH_VARARGS,
     "copy(dst, dst_offset, src, src_offset, nbytes) -> nbytes; bounds-checked, releases the GIL for large copies."},
    {"cpu_features", native_cpu_features, METH_NOARGS, "Cache-line and SIMD features of this CPU."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "kvrack._native",
                                    "Primitives on mapped memory for kvrack.", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
