/*
 * The CXL tier's shared index, read and written with the cache-line protocol
 * that non-coherent shared memory needs (layout: tiers/cxl_layout.py).
 *
 * An entry is one 64-byte line: version (seqlock, odd while it changes), meta
 * (state in the low byte, owning host above), the 32-byte key, loc (chunk in the
 * low 32 bits, length in the high 32) and a checksum. Writers make the version
 * odd and flush, write the fields and flush, make it even and flush. Readers
 * drop the line from their cache, read it whole, and take it only when the
 * version is even; cxl_read re-reads the version after copying the block and
 * retries when it moved, so a block evicted or rewritten mid-copy is never
 * returned torn.
 */
#include "kvrack_native.h"

#include <string.h>

#define ENTRY_BYTES 64
#define KEY_BYTES 32
#define STATE_EMPTY 0
#define STATE_WRITING 1
#define STATE_READY 2
#define STATE_TOMBSTONE 3
#define SPIN_LIMIT 4096
#define BATCH_INVALIDATE 16 /* home lines dropped per fence in a batched lookup */

typedef struct {
    uint64_t version;
    uint64_t meta;
    unsigned char key[KEY_BYTES];
    uint64_t loc;
    uint64_t check;
} entry_t;

_Static_assert(sizeof(entry_t) == ENTRY_BYTES, "an index entry is one cache line");

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("pause");
#endif
}

static inline uint64_t home_slot(const unsigned char *key, Py_ssize_t nslots) {
    uint64_t h;
    memcpy(&h, key, sizeof h); /* keys are uniform hashes already */
    return h % (uint64_t)nslots;
}

/* A stable copy of entry e: 0 when read, -1 when it stayed odd or kept changing. `fresh` says
 * the caller already dropped the line (and fenced) so the first attempt need not. */
static int snapshot(const entry_t *e, entry_t *out, int invalidate, int fresh) {
    for (int spin = 0; spin < SPIN_LIMIT; spin++) {
        if (invalidate && !(fresh && spin == 0)) {
            kv_invalidate_range(e, ENTRY_BYTES);
            kv_mfence();
        }
        uint64_t v1 = __atomic_load_n(&e->version, __ATOMIC_ACQUIRE);
        if (v1 & 1) {
            cpu_relax();
            continue;
        }
        memcpy(out, e, ENTRY_BYTES);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&e->version, __ATOMIC_ACQUIRE) == v1 && out->version == v1) return 0;
        cpu_relax();
    }
    return -1;
}

/* 1 and the slot and its snapshot when key is READY, 0 when absent (or still being written), -1 when busy. */
static int probe(const char *index, Py_ssize_t nslots, const unsigned char *key, int invalidate, int home_fresh,
                 Py_ssize_t *slot, entry_t *snap) {
    uint64_t h = home_slot(key, nslots);
    for (Py_ssize_t i = 0; i < nslots; i++) {
        Py_ssize_t s = (Py_ssize_t)((h + (uint64_t)i) % (uint64_t)nslots);
        const entry_t *e = (const entry_t *)(index + s * ENTRY_BYTES);
        if (snapshot(e, snap, invalidate, home_fresh && i == 0) < 0) return -1;
        unsigned state = (unsigned)(snap->meta & 0xff);
        if (state == STATE_EMPTY) return 0;
        if (state != STATE_TOMBSTONE && memcmp(snap->key, key, KEY_BYTES) == 0) {
            if (state != STATE_READY) return 0;
            *slot = s;
            return 1;
        }
    }
    return 0;
}

/* The entry slot of key, or -1, into *out (unaligned-safe). */
static void probe_into(const char *index, Py_ssize_t nslots, const unsigned char *key, int invalidate, int home_fresh,
                       int64_t *out) {
    Py_ssize_t slot = -1;
    entry_t snap;
    int64_t v = probe(index, nslots, key, invalidate, home_fresh, &slot, &snap) == 1 ? (int64_t)slot : -1;
    memcpy(out, &v, sizeof v);
}

static int check_key(const char *fn, Py_buffer *key) {
    if (key->len == KEY_BYTES) return 0;
    PyErr_Format(PyExc_ValueError, "%s: a key is %d bytes, got %zd", fn, KEY_BYTES, key->len);
    return -1;
}

static int check_index(const char *fn, Py_buffer *region, Py_ssize_t index_off, Py_ssize_t nslots) {
    if (nslots <= 0 || index_off % ENTRY_BYTES) {
        PyErr_Format(PyExc_ValueError, "%s: the index needs nslots > 0 and a 64-byte aligned offset", fn);
        return -1;
    }
    if (nslots > (PY_SSIZE_T_MAX - index_off) / ENTRY_BYTES)
        return kv_check_range(fn, "index", region->len, index_off, PY_SSIZE_T_MAX - index_off);
    if (((uintptr_t)region->buf + (uintptr_t)index_off) % 8) {
        PyErr_Format(PyExc_ValueError, "%s: the index is not 8-byte aligned in memory", fn);
        return -1;
    }
    return kv_check_range(fn, "index", region->len, index_off, nslots * ENTRY_BYTES);
}

PyObject *kv_cxl_lookup(PyObject *self, PyObject *args) {
    Py_buffer region, keys, out;
    Py_ssize_t index_off, nslots;
    int invalidate;
    if (!PyArg_ParseTuple(args, "y*nny*w*p:cxl_lookup", &region, &index_off, &nslots, &keys, &out, &invalidate))
        return NULL;
    PyObject *ret = NULL;
    Py_ssize_t n = keys.len / KEY_BYTES;
    if (check_index("cxl_lookup", &region, index_off, nslots) < 0) goto done;
    if (keys.len % KEY_BYTES) {
        PyErr_Format(PyExc_ValueError, "cxl_lookup: keys must be a multiple of %d bytes, got %zd", KEY_BYTES, keys.len);
        goto done;
    }
    if (out.len < n * 8) {
        PyErr_Format(PyExc_ValueError, "cxl_lookup: out holds %zd bytes, %zd keys need %zd", out.len, n, n * 8);
        goto done;
    }
    Py_ssize_t leading = 0;
    int in_prefix = 1;
    const char *index = (const char *)region.buf + index_off;
    int64_t *res = out.buf;
    PyThreadState *ts = n >= 256 ? PyEval_SaveThread() : NULL;
    /* Drop every key's home line first, one fence for the batch: the probes' cache misses then
     * overlap instead of each waiting for its own flush and fence. A line fetched after the
     * fence is as fresh as memory, which is all the protocol needs. */
    for (Py_ssize_t i = 0; invalidate && i < n; i += BATCH_INVALIDATE) {
        Py_ssize_t end = i + BATCH_INVALIDATE < n ? i + BATCH_INVALIDATE : n;
        for (Py_ssize_t j = i; j < end; j++)
            kv_invalidate_range(index + home_slot((const unsigned char *)keys.buf + j * KEY_BYTES, nslots) * ENTRY_BYTES,
                                ENTRY_BYTES);
        kv_mfence();
        for (Py_ssize_t j = i; j < end; j++)
            probe_into(index, nslots, (const unsigned char *)keys.buf + j * KEY_BYTES, invalidate, 1, res + j);
    }
    for (Py_ssize_t i = 0; !invalidate && i < n; i++)
        probe_into(index, nslots, (const unsigned char *)keys.buf + i * KEY_BYTES, 0, 0, res + i);
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t v;
        memcpy(&v, res + i, sizeof v);
        if (v >= 0 && in_prefix) leading++;
        else in_prefix = 0;
    }
    if (ts) PyEval_RestoreThread(ts);
    ret = PyLong_FromSsize_t(leading);
done:
    PyBuffer_Release(&region);
    PyBuffer_Release(&keys);
    PyBuffer_Release(&out);
    return ret;
}

/* The reader's record of what its host's caches already hold (`validated`, one uint64 per index
 * slot plus two counters): validated[s] == v says that after (slot s, version v) was published this
 * process dropped the block's lines and read it. A slot's version only grows while the region lives
 * (every change of an entry goes through cxl_publish, which bumps it) and a block's chunk is not
 * rewritten while an entry names it, so any line of the chunk cached since then holds this block:
 * reading it again needs no invalidation of the data. Any other version (the block was replaced,
 * moved, or never read here) drops the data lines as usual. The entry line is always dropped. */
#define VALIDATED_SKIPPED 0 /* counters after the nslots words: reads that skipped the data invalidation */
#define VALIDATED_DROPPED 1 /* and reads that dropped the block's lines */

static int check_validated(Py_buffer *v, Py_ssize_t nslots) {
    if (v->len / 8 >= nslots + 2 && ((uintptr_t)v->buf % 8) == 0) return 0;
    PyErr_Format(PyExc_ValueError, "cxl_read: validated must be %zd 8-byte aligned uint64 words (nslots + 2), got %zd "
                 "bytes", nslots + 2, v->len);
    return -1;
}

/* What a block read needs of the region, and what it found when it could not read. */
typedef struct {
    const char *base, *index;
    Py_ssize_t len, nslots, data_off, chunk_bytes;
    int invalidate, retries;
    uint64_t *seen; /* the reader's validated record, or NULL */
} read_geom_t;

enum { READ_ABSENT = -1, READ_BUSY = -2, READ_CORRUPT = -3, READ_TOO_SMALL = -4 };

typedef struct {
    Py_ssize_t slot;
    uint64_t chunk, nbytes;
} read_fail_t;

/* Read key's block into d (room for cap bytes): its length, or READ_ABSENT / READ_BUSY, or READ_CORRUPT /
 * READ_TOO_SMALL with *why filled in. Touches no Python object: callers may hold or drop the GIL. */
static Py_ssize_t read_block(const read_geom_t *g, const unsigned char *key, char *d, Py_ssize_t cap,
                             read_fail_t *why) {
    for (int attempt = 0; attempt <= g->retries; attempt++) {
        Py_ssize_t slot = -1;
        entry_t snap;
        int r = probe(g->index, g->nslots, key, g->invalidate, 0, &slot, &snap);
        if (r == 0) return READ_ABSENT;
        if (r < 0) continue;
        uint64_t chunk = snap.loc & 0xffffffffu, nbytes = snap.loc >> 32;
        Py_ssize_t nchunks = (g->len - g->data_off) / g->chunk_bytes;
        why->slot = slot;
        why->chunk = chunk;
        why->nbytes = nbytes;
        if (chunk >= (uint64_t)nchunks || nbytes > (uint64_t)g->chunk_bytes) return READ_CORRUPT;
        if ((uint64_t)cap < nbytes) return READ_TOO_SMALL;
        const char *src = g->base + g->data_off + (Py_ssize_t)chunk * g->chunk_bytes;
        const entry_t *e = (const entry_t *)(g->index + slot * ENTRY_BYTES);
        int drop = g->invalidate && !(g->seen && __atomic_load_n(&g->seen[slot], __ATOMIC_RELAXED) == snap.version);
        if (drop) {
            kv_invalidate_range(src, nbytes);
            kv_mfence();
        }
        memcpy(d, src, nbytes);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        kv_lfence();
        if (g->invalidate) {
            kv_invalidate_range(e, ENTRY_BYTES);
            kv_mfence();
        }
        if (__atomic_load_n(&e->version, __ATOMIC_ACQUIRE) != snap.version) continue;
        if (g->seen && g->invalidate) {
            __atomic_store_n(&g->seen[slot], snap.version, __ATOMIC_RELAXED);
            __atomic_fetch_add(&g->seen[g->nslots + (drop ? VALIDATED_DROPPED : VALIDATED_SKIPPED)], 1,
                               __ATOMIC_RELAXED);
        }
        return (Py_ssize_t)nbytes;
    }
    return READ_BUSY;
}

/* A clear error for READ_CORRUPT / READ_TOO_SMALL; 0 for any other result. */
static int read_error(const char *fn, Py_ssize_t r, const read_fail_t *why, const read_geom_t *g, Py_ssize_t cap) {
    if (r == READ_CORRUPT) {
        PyErr_Format(PyExc_RuntimeError, "%s: index entry %zd names chunk %llu length %llu, outside the region's %zd "
                     "chunks of %zd bytes (corrupt region?)", fn, why->slot, (unsigned long long)why->chunk,
                     (unsigned long long)why->nbytes, (g->len - g->data_off) / g->chunk_bytes, g->chunk_bytes);
        return -1;
    }
    if (r == READ_TOO_SMALL) {
        PyErr_Format(PyExc_ValueError, "%s: the block is %llu bytes, the destination has room for %zd",
                     fn, (unsigned long long)why->nbytes, cap);
        return -1;
    }
    return 0;
}

/* Shared set-up of cxl_read and cxl_read_many: geometry checks and the optional validated record. */
static int read_setup(const char *fn, Py_buffer *region, Py_ssize_t index_off, Py_ssize_t nslots,
                      Py_ssize_t data_off, Py_ssize_t chunk_bytes, int invalidate, int retries,
                      PyObject *validated_obj, Py_buffer *validated, read_geom_t *g) {
    if (check_index(fn, region, index_off, nslots) < 0) return -1;
    if (chunk_bytes <= 0 || data_off < 0 || data_off > region->len) {
        PyErr_Format(PyExc_ValueError, "%s: bad data geometry", fn);
        return -1;
    }
    g->seen = NULL;
    if (validated_obj != Py_None) {
        if (PyObject_GetBuffer(validated_obj, validated, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
        if (check_validated(validated, nslots) < 0) return -1;
        g->seen = (uint64_t *)validated->buf;
    }
    g->base = (const char *)region->buf;
    g->index = g->base + index_off;
    g->len = region->len;
    g->nslots = nslots;
    g->data_off = data_off;
    g->chunk_bytes = chunk_bytes;
    g->invalidate = invalidate;
    g->retries = retries;
    return 0;
}

PyObject *kv_cxl_read(PyObject *self, PyObject *args) {
    Py_buffer region, key, dst, validated = {0};
    Py_ssize_t index_off, nslots, data_off, chunk_bytes, dst_off;
    int invalidate, retries;
    PyObject *validated_obj = Py_None;
    if (!PyArg_ParseTuple(args, "y*nnnny*w*npi|O:cxl_read", &region, &index_off, &nslots, &data_off, &chunk_bytes,
                          &key, &dst, &dst_off, &invalidate, &retries, &validated_obj))
        return NULL;
    PyObject *ret = NULL;
    read_geom_t g;
    read_fail_t why;
    if (read_setup("cxl_read", &region, index_off, nslots, data_off, chunk_bytes, invalidate, retries,
                   validated_obj, &validated, &g) < 0)
        goto done;
    if (check_key("cxl_read", &key) < 0) goto done;
    if (kv_check_range("cxl_read", "destination", dst.len, dst_off, 0) < 0) goto done;
    Py_ssize_t cap = dst.len - dst_off;
    PyThreadState *ts = cap >= KV_GIL_RELEASE_BYTES ? PyEval_SaveThread() : NULL;
    Py_ssize_t r = read_block(&g, key.buf, (char *)dst.buf + dst_off, cap, &why);
    if (ts) PyEval_RestoreThread(ts);
    if (read_error("cxl_read", r, &why, &g, cap) == 0) ret = PyLong_FromSsize_t(r);
done:
    PyBuffer_Release(&region);
    PyBuffer_Release(&key);
    PyBuffer_Release(&dst);
    if (validated.obj) PyBuffer_Release(&validated);
    return ret;
}

PyObject *kv_cxl_read_many(PyObject *self, PyObject *args) {
    Py_buffer region, keys, validated = {0};
    Py_ssize_t index_off, nslots, data_off, chunk_bytes;
    int invalidate, retries;
    PyObject *dsts_obj, *validated_obj = Py_None;
    if (!PyArg_ParseTuple(args, "y*nnnny*Opi|O:cxl_read_many", &region, &index_off, &nslots, &data_off,
                          &chunk_bytes, &keys, &dsts_obj, &invalidate, &retries, &validated_obj))
        return NULL;
    PyObject *ret = NULL, *dsts = NULL;
    Py_buffer *views = NULL;
    Py_ssize_t *results = NULL, n = 0, held = 0;
    read_geom_t g;
    read_fail_t why = {0};
    if (read_setup("cxl_read_many", &region, index_off, nslots, data_off, chunk_bytes, invalidate, retries,
                   validated_obj, &validated, &g) < 0)
        goto done;
    if (keys.len % KEY_BYTES) {
        PyErr_Format(PyExc_ValueError, "cxl_read_many: keys must be a multiple of %d bytes, got %zd", KEY_BYTES,
                     keys.len);
        goto done;
    }
    dsts = PySequence_Fast(dsts_obj, "cxl_read_many: destinations must be a sequence of writable buffers");
    if (!dsts) goto done;
    n = keys.len / KEY_BYTES;
    if (PySequence_Fast_GET_SIZE(dsts) != n) {
        PyErr_Format(PyExc_ValueError, "cxl_read_many: %zd keys but %zd destinations", n, PySequence_Fast_GET_SIZE(dsts));
        goto done;
    }
    views = PyMem_Calloc((size_t)n + 1, sizeof *views);
    results = PyMem_Calloc((size_t)n + 1, sizeof *results);
    if (!views || !results) {
        PyErr_NoMemory();
        goto done;
    }
    for (; held < n; held++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(dsts, held), &views[held], PyBUF_WRITABLE) < 0) goto done;
    Py_ssize_t failed = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        results[i] = read_block(&g, (const unsigned char *)keys.buf + i * KEY_BYTES, views[i].buf, views[i].len, &why);
        if (results[i] == READ_CORRUPT || results[i] == READ_TOO_SMALL) {
            failed = i;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    if (failed >= 0) {
        read_error("cxl_read_many", results[failed], &why, &g, views[failed].len);
        goto done;
    }
    ret = PyList_New(n);
    for (Py_ssize_t i = 0; ret && i < n; i++) {
        PyObject *v = PyLong_FromSsize_t(results[i]);
        if (!v) {
            Py_CLEAR(ret);
            break;
        }
        PyList_SET_ITEM(ret, i, v);
    }
done:
    for (Py_ssize_t i = 0; i < held; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(results);
    Py_XDECREF(dsts);
    PyBuffer_Release(&region);
    PyBuffer_Release(&keys);
    if (validated.obj) PyBuffer_Release(&validated);
    return ret;
}

PyObject *kv_cxl_publish(PyObject *self, PyObject *args) {
    Py_buffer region, key;
    Py_ssize_t off;
    unsigned long long meta, loc, check;
    if (!PyArg_ParseTuple(args, "w*nKy*KK:cxl_publish", &region, &off, &meta, &key, &loc, &check)) return NULL;
    PyObject *ret = NULL;
    if (kv_check_range("cxl_publish", "entry", region.len, off, ENTRY_BYTES) < 0) goto done;
    if (((uintptr_t)region.buf + (uintptr_t)off) % ENTRY_BYTES) {
        PyErr_Format(PyExc_ValueError, "cxl_publish: entry offset %zd is not on a cache line", off);
        goto done;
    }
    if (check_key("cxl_publish", &key) < 0) goto done;
    entry_t *e = (entry_t *)((char *)region.buf + off);
    kv_invalidate_range(e, ENTRY_BYTES);
    kv_mfence();
    /* an odd version left by a writer that died mid-update is closed by this one */
    uint64_t odd = __atomic_load_n(&e->version, __ATOMIC_ACQUIRE) | 1;
    __atomic_store_n(&e->version, odd, __ATOMIC_RELEASE);
    kv_flush_range(e, ENTRY_BYTES);
    kv_sfence();
    e->meta = meta;
    memcpy(e->key, key.buf, KEY_BYTES);
    e->loc = loc;
    e->check = check;
    kv_flush_range(e, ENTRY_BYTES);
    kv_sfence();
    __atomic_store_n(&e->version, odd + 1, __ATOMIC_RELEASE);
    kv_flush_range(e, ENTRY_BYTES);
    kv_sfence();
    ret = PyLong_FromUnsignedLongLong(odd + 1);
done:
    PyBuffer_Release(&region);
    PyBuffer_Release(&key);
    return ret;
}
