/*
 * Shared by the files of kvrack._native: cache-line primitives chosen at load
 * time and the buffer-range checks every entry point applies.
 */
#ifndef KVRACK_NATIVE_H
#define KVRACK_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define KV_LINE 64
#define KV_GIL_RELEASE_BYTES (64 * 1024)

/* Write back the lines covering [p, p + n) (clwb, else clflushopt, else clflush). */
extern void (*kv_flush_range)(const void *p, size_t n);
/* Write back and drop the lines covering [p, p + n) so the next load reads memory. */
extern void (*kv_invalidate_range)(const void *p, size_t n);
/* Copy with non-temporal stores into dst / non-temporal loads from src; both end with a fence. */
void kv_nt_store_copy(void *dst, const void *src, size_t n);
void kv_nt_load_copy(void *dst, const void *src, size_t n);

static inline void kv_sfence(void) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("sfence" ::: "memory");
#else
    __atomic_thread_fence(__ATOMIC_RELEASE);
#endif
}

static inline void kv_lfence(void) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("lfence" ::: "memory");
#else
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
#endif
}

static inline void kv_mfence(void) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("mfence" ::: "memory");
#else
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

/* 0 and a ValueError naming `what` unless 0 <= off and off + n <= len. */
int kv_check_range(const char *fn, const char *what, Py_ssize_t len, Py_ssize_t off, Py_ssize_t n);

PyObject *kv_cxl_lookup(PyObject *self, PyObject *args);
PyObject *kv_cxl_read(PyObject *self, PyObject *args);
PyObject *kv_cxl_read_many(PyObject *self, PyObject *args);
PyObject *kv_cxl_publish(PyObject *self, PyObject *args);

#endif
