/*
 * cowfs._native: the compiled part of cowfs's read path.
 *
 *   RangeMap   the range map of rangemap.py (same API, same semantics, same
 *              64 MiB bucket layout), kept in C memory that the READ server
 *              can walk without the GIL;
 *   StoreLogs  a table log index -> fd, for store offsets
 *              ``log << 44 | offset_in_log``;
 *   View       one file's view state as the READ server sees it: size,
 *              base_limit, base fd and identity, range map, store logs, and
 *              the file's lock;
 *   request_filter()  a pyfuse3 request filter (patch 0005) that answers
 *              READs of registered handles from that state and marks files
 *              busy while a request that changes them waits for Python.
 *
 * The rules (docs/design.md, "The compiled read path"):
 *   - Python changes a view's state only while it holds the view's lock
 *     (``with view:``); leaving the lock publishes the owner's size,
 *     base_limit, base fd, identity and store fd into the view.  The map is
 *     shared, so its changes are seen at once -- they too happen under the
 *     lock.  A READ served here reads the state under the same lock, so it
 *     sees the state before or after a change, never a mix.
 *   - Python closes a view's fds only under its lock; the reader thread uses
 *     them only under the lock; a worker thread (cold reads) reads through
 *     its own dup()s.
 *   - WRITE, FALLOCATE, SETATTR with a size, COPY_FILE_RANGE and OPEN with
 *     O_TRUNC mark their file busy before they are queued for Python; the
 *     mark clears when pyfuse3 has written their reply.  READs of a busy
 *     file go to Python, queued behind them.
 *   - Anything unusual (an unknown handle, a base that changed, an error,
 *     more pieces than fit) goes to Python, which answers as without this
 *     module.
 *
 * No function here takes the GIL outside the Python-facing methods.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

#define BUCKET_SHIFT 26
#define ZEROS (-1)
#define STORE_LOG_SHIFT 44
#define DIRECT_IO_ALIGNMENT 512
/* A READ is at most 1 MiB (libfuse's max_pages); a page extra for safety */
#define MAX_READ ((size_t) 1 << 20)
/* Pieces one READ may need (base, store, zeros); beyond that it goes to Python */
#define MAX_PIECES 256
#define MAX_WORKERS 16
/* A cold read warms the page cache this often before it reads under the lock */
#define COLD_ATTEMPTS 3

/* ------------------------------------------------------------------------ */
/* The range map                                                            */
/* ------------------------------------------------------------------------ */

typedef struct {
    atomic_long refs; /* maps that hold it: snapshots share buckets until one of them changes it */
    int64_t key;      /* file offset >> BUCKET_SHIFT */
    Py_ssize_t len, cap;
    int64_t *starts, *ends, *stores; /* one allocation of 3 * cap */
} Bucket;

typedef struct {
    atomic_long refs;
    Bucket **buckets; /* sorted by key, none empty */
    Py_ssize_t count, cap;
    int64_t total;  /* bytes mapped to the store */
    int64_t zeroed; /* bytes mapped to ZEROS */
} MapCore;

/* Memory from PyMem_Raw*: thread-safe without the GIL, and tracemalloc sees it */

static MapCore *map_new(void)
{
    MapCore *m = PyMem_RawCalloc(1, sizeof(MapCore));
    if (m != NULL)
        atomic_init(&m->refs, 1);
    return m;
}

static void bucket_unref(Bucket *b)
{
    if (atomic_fetch_sub(&b->refs, 1) == 1) {
        PyMem_RawFree(b->starts);
        PyMem_RawFree(b);
    }
}

static void map_clear(MapCore *m)
{
    for (Py_ssize_t i = 0; i < m->count; i++)
        bucket_unref(m->buckets[i]);
    PyMem_RawFree(m->buckets);
    m->buckets = NULL;
    m->count = m->cap = 0;
    m->total = m->zeroed = 0;
}

static void map_ref(MapCore *m)
{
    atomic_fetch_add(&m->refs, 1);
}

static void map_unref(MapCore *m)
{
    if (m != NULL && atomic_fetch_sub(&m->refs, 1) == 1) {
        map_clear(m);
        PyMem_RawFree(m);
    }
}

/* First index i with a[i] > x */
static Py_ssize_t bisect_right(const int64_t *a, Py_ssize_t n, int64_t x)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (x < a[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* First index i with a[i] >= x */
static Py_ssize_t bisect_left(const int64_t *a, Py_ssize_t n, int64_t x)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (a[mid] < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Index of the first bucket whose key is >= key */
static Py_ssize_t map_find(const MapCore *m, int64_t key)
{
    Py_ssize_t lo = 0, hi = m->count;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (m->buckets[mid]->key < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int bucket_reserve(Bucket *b, Py_ssize_t need)
{
    Py_ssize_t cap;
    int64_t *mem;

    if (need <= b->cap)
        return 0;
    cap = b->cap ? b->cap : 4;
    while (cap < need)
        cap += cap / 2 + 1;
    mem = PyMem_RawMalloc((size_t) cap * 3 * sizeof(int64_t));
    if (mem == NULL)
        return -1;
    if (b->len) {
        memcpy(mem, b->starts, (size_t) b->len * sizeof(int64_t));
        memcpy(mem + cap, b->ends, (size_t) b->len * sizeof(int64_t));
        memcpy(mem + 2 * cap, b->stores, (size_t) b->len * sizeof(int64_t));
    }
    PyMem_RawFree(b->starts);
    b->starts = mem;
    b->ends = mem + cap;
    b->stores = mem + 2 * cap;
    b->cap = cap;
    return 0;
}

/* Replace ranges [i, j) of b by the n ranges given (n <= 2 or any, room is made) */
static int bucket_splice(Bucket *b, Py_ssize_t i, Py_ssize_t j, Py_ssize_t n, const int64_t *starts,
                         const int64_t *ends, const int64_t *stores)
{
    Py_ssize_t tail = b->len - j;
    Py_ssize_t new_len = b->len - (j - i) + n;

    if (bucket_reserve(b, new_len) < 0)
        return -1;
    if (tail && i + n != j) {
        memmove(b->starts + i + n, b->starts + j, (size_t) tail * sizeof(int64_t));
        memmove(b->ends + i + n, b->ends + j, (size_t) tail * sizeof(int64_t));
        memmove(b->stores + i + n, b->stores + j, (size_t) tail * sizeof(int64_t));
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        b->starts[i + k] = starts[k];
        b->ends[i + k] = ends[k];
        b->stores[i + k] = stores[k];
    }
    b->len = new_len;
    return 0;
}

static int map_insert_bucket(MapCore *m, Py_ssize_t index, Bucket *b)
{
    if (m->count == m->cap) {
        Py_ssize_t cap = m->cap ? m->cap * 2 : 8;
        Bucket **mem = PyMem_RawRealloc(m->buckets, (size_t) cap * sizeof(Bucket *));
        if (mem == NULL)
            return -1;
        m->buckets = mem;
        m->cap = cap;
    }
    memmove(m->buckets + index + 1, m->buckets + index, (size_t) (m->count - index) * sizeof(Bucket *));
    m->buckets[index] = b;
    m->count++;
    return 0;
}

/* The bucket at index, copied first if another map shares it (only the Python
   thread adds sharers, so a bucket held once stays so while it is changed); NULL on no memory */
static Bucket *map_writable(MapCore *m, Py_ssize_t index)
{
    Bucket *b = m->buckets[index], *copy;

    if (atomic_load(&b->refs) == 1)
        return b;
    copy = PyMem_RawCalloc(1, sizeof(Bucket));
    if (copy == NULL || bucket_reserve(copy, b->len) < 0) {
        PyMem_RawFree(copy);
        return NULL;
    }
    atomic_init(&copy->refs, 1);
    copy->key = b->key;
    copy->len = b->len;
    memcpy(copy->starts, b->starts, (size_t) b->len * sizeof(int64_t));
    memcpy(copy->ends, b->ends, (size_t) b->len * sizeof(int64_t));
    memcpy(copy->stores, b->stores, (size_t) b->len * sizeof(int64_t));
    m->buckets[index] = copy;
    bucket_unref(b);
    return copy;
}

static void map_delete_bucket(MapCore *m, Py_ssize_t index)
{
    bucket_unref(m->buckets[index]);
    memmove(m->buckets + index, m->buckets + index + 1, (size_t) (m->count - index - 1) * sizeof(Bucket *));
    m->count--;
}

/* Do the bytes at next_store continue [start, end) at store (so that they merge)? */
static int continues(int64_t start, int64_t end, int64_t store, int64_t next_store)
{
    if (store == ZEROS || next_store == ZEROS)
        return store == next_store;
    return store + end - start == next_store;
}

/* 1 if [start, end) (inside one bucket) overlaps a range of the map */
static int bucket_overlaps(const Bucket *b, int64_t start, int64_t end)
{
    Py_ssize_t i = bisect_right(b->starts, b->len, start);
    return (i > 0 && b->ends[i - 1] > start) || (i < b->len && b->starts[i] < end);
}

static int map_add_in_bucket(MapCore *m, int64_t key, int64_t start, int64_t end, int64_t store)
{
    Py_ssize_t index = map_find(m, key);
    Bucket *b;
    Py_ssize_t i;
    int joins_left, joins_right;

    if (index == m->count || m->buckets[index]->key != key) {
        b = PyMem_RawCalloc(1, sizeof(Bucket));
        if (b == NULL || bucket_reserve(b, 4) < 0 || map_insert_bucket(m, index, b) < 0) {
            if (b != NULL)
                PyMem_RawFree(b->starts);
            PyMem_RawFree(b);
            return -1;
        }
        atomic_init(&b->refs, 1);
        b->key = key;
        return bucket_splice(b, 0, 0, 1, &start, &end, &store);
    }
    b = map_writable(m, index);
    if (b == NULL)
        return -1;
    i = bisect_right(b->starts, b->len, start); /* ranges [0, i) start at or before start */
    joins_left = i > 0 && b->ends[i - 1] == start && continues(b->starts[i - 1], start, b->stores[i - 1], store);
    joins_right = i < b->len && b->starts[i] == end && continues(start, end, store, b->stores[i]);
    if (joins_left && joins_right) {
        int64_t s = b->starts[i - 1], e = b->ends[i], st = b->stores[i - 1];
        return bucket_splice(b, i - 1, i + 1, 1, &s, &e, &st);
    }
    if (joins_left) {
        b->ends[i - 1] = end;
    } else if (joins_right) {
        b->starts[i] = start;
        b->stores[i] = store;
    } else {
        return bucket_splice(b, i, i, 1, &start, &end, &store);
    }
    return 0;
}

/* Map [start, end) to store (or ZEROS); -1 with ValueError if it overlaps,
   -2 on no memory.  *added: the bytes added. */
static int map_add(MapCore *m, int64_t start, int64_t end, int64_t store, int64_t *added)
{
    int64_t pos, total = 0;

    *added = 0;
    for (pos = start; pos < end;) { /* check first: a refused add changes nothing */
        int64_t key = pos >> BUCKET_SHIFT;
        int64_t stop = end < ((key + 1) << BUCKET_SHIFT) ? end : (key + 1) << BUCKET_SHIFT;
        Py_ssize_t index = map_find(m, key);
        if (index < m->count && m->buckets[index]->key == key && bucket_overlaps(m->buckets[index], pos, stop))
            return -1;
        pos = stop;
    }
    for (pos = start; pos < end;) {
        int64_t key = pos >> BUCKET_SHIFT;
        int64_t stop = end < ((key + 1) << BUCKET_SHIFT) ? end : (key + 1) << BUCKET_SHIFT;
        if (map_add_in_bucket(m, key, pos, stop, store) < 0) {
            if (store == ZEROS)
                m->zeroed += total;
            else
                m->total += total;
            *added = total;
            return -2;
        }
        total += stop - pos;
        if (store != ZEROS)
            store += stop - pos;
        pos = stop;
    }
    if (store == ZEROS)
        m->zeroed += total;
    else
        m->total += total;
    *added = total;
    return 0;
}

/* Unmap [start, end); return the store bytes removed, or -1 on no memory */
static int64_t map_remove(MapCore *m, int64_t start, int64_t end)
{
    int64_t removed = 0, zeroed = 0;
    Py_ssize_t index;

    if (start >= end || m->count == 0)
        return 0;
    index = map_find(m, start >> BUCKET_SHIFT);
    while (index < m->count && m->buckets[index]->key <= (end - 1) >> BUCKET_SHIFT) {
        Bucket *b = m->buckets[index];
        Py_ssize_t i = bisect_right(b->ends, b->len, start); /* first range that ends after start */
        Py_ssize_t j = bisect_left(b->starts, b->len, end);  /* first that starts at or after end */
        int64_t kept_starts[2], kept_ends[2], kept_stores[2];
        Py_ssize_t kept = 0;

        if (i >= j) {
            index++;
            continue;
        }
        b = map_writable(m, index);
        if (b == NULL)
            return -1;
        for (Py_ssize_t k = i; k < j; k++) {
            int64_t s = b->starts[k] > start ? b->starts[k] : start;
            int64_t e = b->ends[k] < end ? b->ends[k] : end;
            if (b->stores[k] == ZEROS)
                zeroed += e - s;
            else
                removed += e - s;
        }
        if (b->starts[i] < start) { /* the head of the first range stays */
            kept_starts[kept] = b->starts[i];
            kept_ends[kept] = start;
            kept_stores[kept] = b->stores[i];
            kept++;
        }
        if (b->ends[j - 1] > end) { /* the tail of the last range stays */
            kept_starts[kept] = end;
            kept_ends[kept] = b->ends[j - 1];
            kept_stores[kept] = b->stores[j - 1] == ZEROS ? ZEROS : b->stores[j - 1] + end - b->starts[j - 1];
            kept++;
        }
        if (bucket_splice(b, i, j, kept, kept_starts, kept_ends, kept_stores) < 0)
            return -1; /* cannot happen: the bucket never grows by more than one */
        if (b->len == 0)
            map_delete_bucket(m, index);
        else
            index++;
    }
    m->total -= removed;
    m->zeroed -= zeroed;
    return removed;
}

static int64_t map_last_end(const MapCore *m)
{
    const Bucket *b;
    if (m->count == 0)
        return 0;
    b = m->buckets[m->count - 1];
    return b->ends[b->len - 1];
}

/* A map with the same ranges, sharing every bucket (NULL on no memory) */
static MapCore *map_snapshot(const MapCore *m)
{
    MapCore *copy = map_new();

    if (copy == NULL)
        return NULL;
    if (m->count) {
        copy->buckets = PyMem_RawMalloc((size_t) m->count * sizeof(Bucket *));
        if (copy->buckets == NULL) {
            map_unref(copy);
            return NULL;
        }
        for (Py_ssize_t i = 0; i < m->count; i++) {
            atomic_fetch_add(&m->buckets[i]->refs, 1);
            copy->buckets[i] = m->buckets[i];
        }
    }
    copy->count = copy->cap = m->count;
    copy->total = m->total;
    copy->zeroed = m->zeroed;
    return copy;
}

/* Called for each piece of map_segments(): mapped is 0 for bytes outside the
   map (store is then meaningless).  Return non-zero to stop. */
typedef int (*segment_fn)(void *ctx, int64_t start, int64_t end, int64_t store, int mapped);

/* As rangemap.RangeMap.segments(): consecutive pieces of [start, end), each
   wholly inside the map or outside it.  Return what fn returned to stop, or 0. */
static int map_segments(const MapCore *m, int64_t start, int64_t end, segment_fn fn, void *ctx)
{
    int64_t pos = start;
    int stop_code;

    if (start < end) {
        int64_t last_key = (end - 1) >> BUCKET_SHIFT;
        for (Py_ssize_t index = map_find(m, start >> BUCKET_SHIFT);
             index < m->count && m->buckets[index]->key <= last_key; index++) {
            const Bucket *b = m->buckets[index];
            int64_t limit = (b->key + 1) << BUCKET_SHIFT;
            int64_t stop = end < limit ? end : limit;
            for (Py_ssize_t i = bisect_right(b->ends, b->len, pos); i < b->len && b->starts[i] < stop; i++) {
                int64_t range_start = b->starts[i] > pos ? b->starts[i] : pos;
                int64_t range_end = b->ends[i] < stop ? b->ends[i] : stop;
                int64_t store = b->stores[i];
                if (range_start > pos && (stop_code = fn(ctx, pos, range_start, 0, 0)) != 0)
                    return stop_code;
                if (store != ZEROS)
                    store += range_start - b->starts[i];
                if ((stop_code = fn(ctx, range_start, range_end, store, 1)) != 0)
                    return stop_code;
                pos = range_end;
            }
        }
    }
    if (pos < end)
        return fn(ctx, pos, end, 0, 0);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* RangeMap, the Python type                                                */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD MapCore *core;
} RangeMapObject;

static PyTypeObject RangeMapType;

static PyObject *rangemap_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    RangeMapObject *self;

    if (PyTuple_GET_SIZE(args) || (kwargs != NULL && PyDict_GET_SIZE(kwargs)))
        return PyErr_Format(PyExc_TypeError, "RangeMap() takes no arguments");
    self = (RangeMapObject *) type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->core = map_new();
    if (self->core == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *) self;
}

static void rangemap_dealloc(RangeMapObject *self)
{
    map_unref(self->core);
    Py_TYPE(self)->tp_free((PyObject *) self);
}

static PyObject *rangemap_add(RangeMapObject *self, PyObject *args)
{
    long long start, end, store;
    int64_t added;
    int res;

    if (!PyArg_ParseTuple(args, "LLL:add", &start, &end, &store))
        return NULL;
    res = map_add(self->core, start, end, store, &added);
    if (res == -1)
        return PyErr_Format(PyExc_ValueError, "[%lld, %lld) overlaps the map", start, end);
    if (res == -2)
        return PyErr_NoMemory();
    return PyLong_FromLongLong(added);
}

static PyObject *rangemap_remove(RangeMapObject *self, PyObject *args)
{
    long long start, end;
    int64_t removed;

    if (!PyArg_ParseTuple(args, "LL:remove", &start, &end))
        return NULL;
    removed = map_remove(self->core, start, end);
    if (removed < 0)
        return PyErr_NoMemory();
    return PyLong_FromLongLong(removed);
}

static PyObject *rangemap_remove_from(RangeMapObject *self, PyObject *arg)
{
    long long offset = PyLong_AsLongLong(arg);
    int64_t last, removed;

    if (offset == -1 && PyErr_Occurred())
        return NULL;
    last = map_last_end(self->core);
    removed = map_remove(self->core, offset, last > offset ? last : offset);
    if (removed < 0)
        return PyErr_NoMemory();
    return PyLong_FromLongLong(removed);
}

static PyObject *rangemap_snapshot(RangeMapObject *self, PyObject *unused)
{
    RangeMapObject *copy = (RangeMapObject *) RangeMapType.tp_alloc(&RangeMapType, 0);

    if (copy == NULL)
        return NULL;
    copy->core = map_snapshot(self->core);
    if (copy->core == NULL) {
        Py_DECREF(copy);
        return PyErr_NoMemory();
    }
    return (PyObject *) copy;
}

static PyObject *rangemap_unshared_spans(RangeMapObject *self, PyObject *other)
{
    const MapCore *a = self->core, *b;
    PyObject *list, *iter;
    Py_ssize_t i = 0, j = 0;
    int pending = 0;
    int64_t p_start = 0, p_end = 0;

    if (!PyObject_TypeCheck(other, &RangeMapType))
        return PyErr_Format(PyExc_TypeError, "unshared_spans() needs a compiled RangeMap");
    b = ((RangeMapObject *) other)->core;
    list = PyList_New(0);
    if (list == NULL)
        return NULL;
    while (i < a->count || j < b->count) {
        int64_t key;
        int differs;
        if (j == b->count || (i < a->count && a->buckets[i]->key < b->buckets[j]->key)) {
            key = a->buckets[i++]->key;
            differs = 1;
        } else if (i == a->count || b->buckets[j]->key < a->buckets[i]->key) {
            key = b->buckets[j++]->key;
            differs = 1;
        } else {
            key = a->buckets[i]->key;
            differs = a->buckets[i++] != b->buckets[j++];
        }
        if (!differs)
            continue;
        if (pending && p_end == key << BUCKET_SHIFT) {
            p_end = (key + 1) << BUCKET_SHIFT;
            continue;
        }
        if (pending) {
            PyObject *item = Py_BuildValue("(LL)", (long long) p_start, (long long) p_end);
            if (item == NULL || PyList_Append(list, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(list);
                return NULL;
            }
            Py_DECREF(item);
        }
        pending = 1;
        p_start = key << BUCKET_SHIFT;
        p_end = (key + 1) << BUCKET_SHIFT;
    }
    if (pending) {
        PyObject *item = Py_BuildValue("(LL)", (long long) p_start, (long long) p_end);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    iter = PyObject_GetIter(list);
    Py_DECREF(list);
    return iter;
}

/* Append (store, store end, view offset) to a list; -1 on error */
static int append_run(PyObject *list, int64_t store, int64_t end, int64_t view)
{
    PyObject *item = Py_BuildValue("(LLL)", (long long) store, (long long) end, (long long) view);
    int res;

    if (item == NULL)
        return -1;
    res = PyList_Append(list, item);
    Py_DECREF(item);
    return res;
}

/* The runs of store bytes of bucket a that bucket b (NULL: none) does not map alike: the same
   store bytes at the same offsets.  Ranges of both are sorted and disjoint. */
static int bucket_runs_only_in(const Bucket *a, const Bucket *b, PyObject *list)
{
    for (Py_ssize_t i = 0; i < a->len; i++) {
        int64_t start = a->starts[i], end = a->ends[i], store = a->stores[i], position = start;
        if (store == ZEROS)
            continue;
        if (b != NULL) {
            for (Py_ssize_t k = bisect_right(b->ends, b->len, start); k < b->len && b->starts[k] < end; k++) {
                int64_t from = b->starts[k] > start ? b->starts[k] : start;
                int64_t to = b->ends[k] < end ? b->ends[k] : end;
                if (b->stores[k] == ZEROS || b->stores[k] + from - b->starts[k] != store + from - start)
                    continue;
                if (from > position && append_run(list, store + position - start, store + from - start, position) < 0)
                    return -1;
                position = to;
            }
        }
        if (position < end && append_run(list, store + position - start, store + end - start, position) < 0)
            return -1;
    }
    return 0;
}

static PyObject *rangemap_runs_only_in(RangeMapObject *self, PyObject *other)
{
    const MapCore *a = self->core, *b;
    PyObject *list;
    Py_ssize_t j = 0;

    if (!PyObject_TypeCheck(other, &RangeMapType))
        return PyErr_Format(PyExc_TypeError, "runs_only_in() needs a compiled RangeMap");
    b = ((RangeMapObject *) other)->core;
    list = PyList_New(0);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < a->count; i++) {
        const Bucket *mine = a->buckets[i], *theirs = NULL;
        while (j < b->count && b->buckets[j]->key < mine->key)
            j++;
        if (j < b->count && b->buckets[j]->key == mine->key)
            theirs = b->buckets[j];
        if (mine == theirs)
            continue;
        if (bucket_runs_only_in(mine, theirs, list) < 0) {
            Py_DECREF(list);
            return NULL;
        }
    }
    return list;
}

static PyObject *rangemap_clear(RangeMapObject *self, PyObject *unused)
{
    map_clear(self->core);
    Py_RETURN_NONE;
}

static PyObject *rangemap_last_end(RangeMapObject *self, PyObject *unused)
{
    return PyLong_FromLongLong(map_last_end(self->core));
}

static int append_segment(void *ctx, int64_t start, int64_t end, int64_t store, int mapped)
{
    PyObject *item;
    int res;

    if (mapped)
        item = Py_BuildValue("(LLL)", (long long) start, (long long) end, (long long) store);
    else
        item = Py_BuildValue("(LLO)", (long long) start, (long long) end, Py_None);
    if (item == NULL)
        return -1;
    res = PyList_Append((PyObject *) ctx, item);
    Py_DECREF(item);
    return res;
}

static PyObject *rangemap_segments(RangeMapObject *self, PyObject *args)
{
    long long start, end;
    PyObject *list, *iter;

    if (!PyArg_ParseTuple(args, "LL:segments", &start, &end))
        return NULL;
    list = PyList_New(0);
    if (list == NULL)
        return NULL;
    if (map_segments(self->core, start, end, append_segment, list) != 0) {
        Py_DECREF(list);
        return NULL;
    }
    iter = PyObject_GetIter(list);
    Py_DECREF(list);
    return iter;
}

static int count_stored(void *ctx, int64_t start, int64_t end, int64_t store, int mapped)
{
    if (mapped && store != ZEROS)
        *(int64_t *) ctx += end - start;
    return 0;
}

static PyObject *rangemap_stored_in(RangeMapObject *self, PyObject *args)
{
    long long start, end;
    int64_t count = 0;

    if (!PyArg_ParseTuple(args, "LL:stored_in", &start, &end))
        return NULL;
    map_segments(self->core, start, end, count_stored, &count);
    return PyLong_FromLongLong(count);
}

/* Calls fn for every extent, merged across bucket boundaries where they continue */
typedef int (*extent_fn)(void *ctx, int64_t start, int64_t end, int64_t store);

static int map_extents(const MapCore *m, extent_fn fn, void *ctx)
{
    int pending = 0;
    int64_t p_start = 0, p_end = 0, p_store = 0;

    for (Py_ssize_t index = 0; index < m->count; index++) {
        const Bucket *b = m->buckets[index];
        for (Py_ssize_t i = 0; i < b->len; i++) {
            if (pending && p_end == b->starts[i] && continues(p_start, p_end, p_store, b->stores[i])) {
                p_end = b->ends[i];
                continue;
            }
            if (pending && fn(ctx, p_start, p_end, p_store) != 0)
                return -1;
            pending = 1;
            p_start = b->starts[i];
            p_end = b->ends[i];
            p_store = b->stores[i];
        }
    }
    if (pending && fn(ctx, p_start, p_end, p_store) != 0)
        return -1;
    return 0;
}

static int append_extent(void *ctx, int64_t start, int64_t end, int64_t store)
{
    PyObject *item = Py_BuildValue("(LLL)", (long long) start, (long long) end, (long long) store);
    int res;

    if (item == NULL)
        return -1;
    res = PyList_Append((PyObject *) ctx, item);
    Py_DECREF(item);
    return res;
}

static PyObject *rangemap_extents(RangeMapObject *self, PyObject *unused)
{
    PyObject *list = PyList_New(0), *iter;

    if (list == NULL)
        return NULL;
    if (map_extents(self->core, append_extent, list) != 0) {
        Py_DECREF(list);
        return NULL;
    }
    iter = PyObject_GetIter(list);
    Py_DECREF(list);
    return iter;
}

typedef struct {
    int zeros; /* -1: all, 1: only ZEROS, 0: only store */
    int pending;
    int64_t start, end;
    PyObject *list;   /* NULL: only count */
    Py_ssize_t count; /* ranges emitted */
} RangesCtx;

static int ranges_emit(RangesCtx *c)
{
    PyObject *item;
    int res;

    c->count++;
    if (c->list == NULL)
        return 0;
    item = Py_BuildValue("(LL)", (long long) c->start, (long long) c->end);
    if (item == NULL)
        return -1;
    res = PyList_Append(c->list, item);
    Py_DECREF(item);
    return res;
}

static int ranges_step(void *ctx, int64_t start, int64_t end, int64_t store)
{
    RangesCtx *c = ctx;

    if (c->zeros >= 0 && (store == ZEROS) != c->zeros)
        return 0;
    if (c->pending && c->end == start) {
        c->end = end;
        return 0;
    }
    if (c->pending && ranges_emit(c) != 0)
        return -1;
    c->pending = 1;
    c->start = start;
    c->end = end;
    return 0;
}

static int map_ranges(const MapCore *m, RangesCtx *c)
{
    if (map_extents(m, ranges_step, c) != 0)
        return -1;
    if (c->pending && ranges_emit(c) != 0)
        return -1;
    return 0;
}

static PyObject *rangemap_ranges(RangeMapObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"zeros", NULL};
    PyObject *zeros = Py_None, *iter;
    RangesCtx c = {-1, 0, 0, 0, NULL, 0};

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O:ranges", keywords, &zeros))
        return NULL;
    if (zeros != Py_None) {
        c.zeros = PyObject_IsTrue(zeros);
        if (c.zeros < 0)
            return NULL;
    }
    c.list = PyList_New(0);
    if (c.list == NULL)
        return NULL;
    if (map_ranges(self->core, &c) != 0) {
        Py_DECREF(c.list);
        return NULL;
    }
    iter = PyObject_GetIter(c.list);
    Py_DECREF(c.list);
    return iter;
}

static Py_ssize_t rangemap_length(RangeMapObject *self)
{
    RangesCtx c = {-1, 0, 0, 0, NULL, 0};
    map_ranges(self->core, &c);
    return c.count;
}

static int rangemap_bool(RangeMapObject *self)
{
    return self->core->count > 0;
}

#define CHECK(cond, ...)                                      \
    do {                                                      \
        if (!(cond)) {                                        \
            PyErr_Format(PyExc_AssertionError, __VA_ARGS__);  \
            return NULL;                                      \
        }                                                     \
    } while (0)

static PyObject *rangemap_check_invariants(RangeMapObject *self, PyObject *unused)
{
    const MapCore *m = self->core;
    int64_t total = 0, zeroed = 0;

    CHECK(m->count <= m->cap, "bucket table overflows");
    for (Py_ssize_t index = 0; index < m->count; index++) {
        const Bucket *b = m->buckets[index];
        int64_t low = b->key << BUCKET_SHIFT, high = (b->key + 1) << BUCKET_SHIFT;
        CHECK(index == 0 || m->buckets[index - 1]->key < b->key, "buckets out of order at key %lld",
              (long long) b->key);
        CHECK(b->len > 0 && b->len <= b->cap, "bucket %lld empty or overflowing", (long long) b->key);
        CHECK(atomic_load(&b->refs) >= 1, "bucket %lld held by no map", (long long) b->key);
        for (Py_ssize_t i = 0; i < b->len; i++) {
            int64_t s = b->starts[i], e = b->ends[i], st = b->stores[i];
            CHECK(low <= s && s < e && e <= high, "(%lld, %lld, %lld)", (long long) b->key, (long long) s,
                  (long long) e);
            CHECK(st >= 0 || st == ZEROS, "(%lld, %lld)", (long long) s, (long long) st);
            if (i > 0) {
                CHECK(s >= b->ends[i - 1], "ranges overlap at %lld", (long long) s);
                CHECK(s != b->ends[i - 1] || !continues(b->starts[i - 1], b->ends[i - 1], b->stores[i - 1], st),
                      "unmerged ranges at %lld", (long long) s);
            }
            if (st == ZEROS)
                zeroed += e - s;
            else
                total += e - s;
        }
    }
    CHECK(total == m->total, "(%lld, %lld)", (long long) total, (long long) m->total);
    CHECK(zeroed == m->zeroed, "(%lld, %lld)", (long long) zeroed, (long long) m->zeroed);
    Py_RETURN_NONE;
}

static PyObject *rangemap_get_total(RangeMapObject *self, void *unused)
{
    return PyLong_FromLongLong(self->core->total);
}

static PyObject *rangemap_get_zeroed(RangeMapObject *self, void *unused)
{
    return PyLong_FromLongLong(self->core->zeroed);
}

static PyMethodDef rangemap_methods[] = {
    {"add", (PyCFunction) rangemap_add, METH_VARARGS,
     "add(start, end, store) -> int: map [start, end), not in the map yet, to the store bytes from store on "
     "(or ZEROS); return end - start"},
    {"remove", (PyCFunction) rangemap_remove, METH_VARARGS,
     "remove(start, end) -> int: unmap [start, end); return the store bytes removed"},
    {"remove_from", (PyCFunction) rangemap_remove_from, METH_O,
     "remove_from(offset) -> int: unmap every byte at or after offset; return the store bytes removed"},
    {"segments", (PyCFunction) rangemap_segments, METH_VARARGS,
     "segments(start, end): consecutive (start, end, store offset, ZEROS or None) pieces of [start, end)"},
    {"extents", (PyCFunction) rangemap_extents, METH_NOARGS,
     "extents(): every (start, end, store offset or ZEROS), merged where they continue"},
    {"ranges", (PyCFunction) (void (*)(void)) rangemap_ranges, METH_VARARGS | METH_KEYWORDS,
     "ranges(zeros=None): covered ranges, touching ones merged (all, only ZEROS, or only store)"},
    {"stored_in", (PyCFunction) rangemap_stored_in, METH_VARARGS,
     "stored_in(start, end) -> int: bytes of [start, end) mapped to the store"},
    {"last_end", (PyCFunction) rangemap_last_end, METH_NOARGS, "last_end() -> int: end of the highest range, or 0"},
    {"clear", (PyCFunction) rangemap_clear, METH_NOARGS, "clear(): unmap everything"},
    {"snapshot", (PyCFunction) rangemap_snapshot, METH_NOARGS,
     "snapshot() -> RangeMap: the same ranges, sharing every bucket until either map changes it"},
    {"unshared_spans", (PyCFunction) rangemap_unshared_spans, METH_O,
     "unshared_spans(other): bucket-aligned, merged [start, end) spans where the maps may differ"},
    {"runs_only_in", (PyCFunction) rangemap_runs_only_in, METH_O,
     "runs_only_in(other) -> list of (store, store end, view offset): the store bytes only this map holds"},
    {"check_invariants", (PyCFunction) rangemap_check_invariants, METH_NOARGS,
     "check_invariants(): raise AssertionError if the documented invariants do not hold"},
    {NULL},
};

static PyGetSetDef rangemap_getset[] = {
    {"total", (getter) rangemap_get_total, NULL, "bytes mapped to the store", NULL},
    {"zeroed", (getter) rangemap_get_zeroed, NULL, "bytes mapped to ZEROS", NULL},
    {NULL},
};

static PyNumberMethods rangemap_as_number = {
    .nb_bool = (inquiry) rangemap_bool,
};

static PySequenceMethods rangemap_as_sequence = {
    .sq_length = (lenfunc) rangemap_length,
};

static PyTypeObject RangeMapType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cowfs._native.RangeMap",
    .tp_doc = "The range map of cowfs.rangemap, in C memory that the READ server reads without the GIL.",
    .tp_basicsize = sizeof(RangeMapObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = rangemap_new,
    .tp_dealloc = (destructor) rangemap_dealloc,
    .tp_methods = rangemap_methods,
    .tp_getset = rangemap_getset,
    .tp_as_number = &rangemap_as_number,
    .tp_as_sequence = &rangemap_as_sequence,
};

/* ------------------------------------------------------------------------ */
/* Store logs: log index -> fd                                              */
/* ------------------------------------------------------------------------ */

#define LOG_CHUNK 1024
#define LOG_CHUNKS (1 << (63 - STORE_LOG_SHIFT - 10)) /* 512 chunks: every log index of an int64 */

typedef struct {
    atomic_long refs;
    _Atomic(atomic_int *) chunks[LOG_CHUNKS];
} LogsCore;

static LogsCore *logs_new(void)
{
    LogsCore *l = PyMem_RawCalloc(1, sizeof(LogsCore));
    if (l != NULL)
        atomic_init(&l->refs, 1);
    return l;
}

static void logs_unref(LogsCore *l)
{
    if (l != NULL && atomic_fetch_sub(&l->refs, 1) == 1) {
        for (int i = 0; i < LOG_CHUNKS; i++)
            PyMem_RawFree(atomic_load(&l->chunks[i]));
        PyMem_RawFree(l);
    }
}

/* The fd of a log, or -1 */
static int logs_get(LogsCore *l, int64_t index)
{
    atomic_int *chunk;

    if (index < 0 || index >= (int64_t) LOG_CHUNKS * LOG_CHUNK)
        return -1;
    chunk = atomic_load_explicit(&l->chunks[index / LOG_CHUNK], memory_order_acquire);
    return chunk == NULL ? -1 : atomic_load_explicit(&chunk[index % LOG_CHUNK], memory_order_relaxed);
}

/* With the GIL (one writer); -1 on no memory */
static int logs_set(LogsCore *l, int64_t index, int fd)
{
    atomic_int *chunk = atomic_load(&l->chunks[index / LOG_CHUNK]);

    if (chunk == NULL) {
        if (fd < 0)
            return 0;
        chunk = PyMem_RawMalloc(LOG_CHUNK * sizeof(atomic_int));
        if (chunk == NULL)
            return -1;
        for (int i = 0; i < LOG_CHUNK; i++)
            atomic_init(&chunk[i], -1);
        atomic_store_explicit(&l->chunks[index / LOG_CHUNK], chunk, memory_order_release);
    }
    atomic_store_explicit(&chunk[index % LOG_CHUNK], fd, memory_order_relaxed);
    return 0;
}

typedef struct {
    PyObject_HEAD LogsCore *core;
} StoreLogsObject;

static PyObject *storelogs_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    StoreLogsObject *self;

    if (PyTuple_GET_SIZE(args) || (kwargs != NULL && PyDict_GET_SIZE(kwargs)))
        return PyErr_Format(PyExc_TypeError, "StoreLogs() takes no arguments");
    self = (StoreLogsObject *) type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->core = logs_new();
    if (self->core == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *) self;
}

static void storelogs_dealloc(StoreLogsObject *self)
{
    logs_unref(self->core);
    Py_TYPE(self)->tp_free((PyObject *) self);
}

static int check_log_index(long long index)
{
    if (index < 0 || index >= (long long) LOG_CHUNKS * LOG_CHUNK) {
        PyErr_Format(PyExc_ValueError, "log index %lld out of range", index);
        return -1;
    }
    return 0;
}

static PyObject *storelogs_set(StoreLogsObject *self, PyObject *args)
{
    long long index;
    int fd;

    if (!PyArg_ParseTuple(args, "Li:set", &index, &fd) || check_log_index(index) < 0)
        return NULL;
    if (logs_set(self->core, index, fd < 0 ? -1 : fd) < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *storelogs_get(StoreLogsObject *self, PyObject *arg)
{
    long long index = PyLong_AsLongLong(arg);

    if ((index == -1 && PyErr_Occurred()) || check_log_index(index) < 0)
        return NULL;
    return PyLong_FromLong(logs_get(self->core, index));
}

static PyMethodDef storelogs_methods[] = {
    {"set", (PyCFunction) storelogs_set, METH_VARARGS,
     "set(index, fd): the fd of log index (-1: none); change it only under the lock of every view that uses it"},
    {"get", (PyCFunction) storelogs_get, METH_O, "get(index) -> int: the fd of log index, or -1"},
    {NULL},
};

static PyTypeObject StoreLogsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cowfs._native.StoreLogs",
    .tp_doc = "Store log index -> fd, as the READ server resolves store offsets (log << 44 | offset).",
    .tp_basicsize = sizeof(StoreLogsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = storelogs_new,
    .tp_dealloc = (destructor) storelogs_dealloc,
    .tp_methods = storelogs_methods,
};

/* ------------------------------------------------------------------------ */
/* View: one file's state for the READ server                               */
/* ------------------------------------------------------------------------ */

typedef struct {
    dev_t dev;
    ino_t ino;
    int64_t size, mtime_ns, ctime_ns;
    nlink_t nlink;
} Identity;

typedef struct {
    atomic_long refs;
    pthread_mutex_t lock;
    atomic_int busy;       /* requests that change the file, passed and not replied */
    atomic_ullong changes; /* how many times Python left the lock: a worker's data is valid if unchanged */
    atomic_int nowait_fails; /* a filesystem refused RWF_NOWAIT: reads go to a worker */
    atomic_int base_modified; /* a worker found the base modified: reads go to Python */
    /* Under lock: */
    int64_t size, base_limit;
    int base_fd; /* -1: none */
    int base_changed;
    int has_identity;
    Identity identity;
    MapCore *map;
    LogsCore *logs;
    int base_in_python; /* the base bytes are not base_fd's (a guest view): Python reads them */
} ViewCore;

static void view_ref(ViewCore *v)
{
    atomic_fetch_add(&v->refs, 1);
}

static void view_unref(ViewCore *v)
{
    if (v != NULL && atomic_fetch_sub(&v->refs, 1) == 1) {
        pthread_mutex_destroy(&v->lock);
        map_unref(v->map);
        logs_unref(v->logs);
        PyMem_RawFree(v);
    }
}

typedef struct {
    PyObject_HEAD ViewCore *core;
    PyObject *owner;      /* weak reference to the OverlayFile whose state this publishes */
    PyObject *map;        /* the RangeMap object whose core the view uses */
    PyObject *identity;   /* the last base identity published (strong) */
    int private_logs;     /* the logs table is the view's own: a copy of owner.log_fds */
    int depth;            /* nested `with view:` of the Python thread */
} ViewObject;

static PyObject *str_size, *str_base_limit, *str_base_fd, *str_base_changed, *str_base_identity, *str_written,
    *str_log_fds, *str_base_is_fd, *str_dev, *str_ino, *str_mtime_ns, *str_ctime_ns, *str_nlink;

static PyObject *view_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"owner", "logs", NULL};
    PyObject *owner, *logs = Py_None;
    ViewObject *self;
    ViewCore *v;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O:View", keywords, &owner, &logs))
        return NULL;
    if (logs != Py_None && !PyObject_TypeCheck(logs, &StoreLogsType))
        return PyErr_Format(PyExc_TypeError, "logs must be a StoreLogs or None");
    self = (ViewObject *) type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    v = PyMem_RawCalloc(1, sizeof(ViewCore));
    if (v == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    atomic_init(&v->refs, 1);
    pthread_mutex_init(&v->lock, NULL);
    v->base_fd = -1;
    self->core = v;
    if (logs == Py_None) {
        v->logs = logs_new();
        self->private_logs = 1;
        if (v->logs == NULL) {
            Py_DECREF(self);
            return PyErr_NoMemory();
        }
    } else {
        v->logs = ((StoreLogsObject *) logs)->core;
        atomic_fetch_add(&v->logs->refs, 1);
    }
    self->owner = PyWeakref_NewRef(owner, NULL);
    if (self->owner == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *) self;
}

static void view_dealloc(ViewObject *self)
{
    Py_XDECREF(self->owner);
    Py_XDECREF(self->map);
    Py_XDECREF(self->identity);
    view_unref(self->core);
    Py_TYPE(self)->tp_free((PyObject *) self);
}

static int get_int64(PyObject *owner, PyObject *name, int64_t *value)
{
    PyObject *obj = PyObject_GetAttr(owner, name);
    long long result;

    if (obj == NULL)
        return -1;
    result = PyLong_AsLongLong(obj);
    Py_DECREF(obj);
    if (result == -1 && PyErr_Occurred())
        return -1;
    *value = result;
    return 0;
}

/* An fd attribute: an int, or None for -1 */
static int get_fd(PyObject *owner, PyObject *name, int *fd)
{
    PyObject *obj = PyObject_GetAttr(owner, name);
    long value;

    if (obj == NULL)
        return -1;
    if (obj == Py_None) {
        Py_DECREF(obj);
        *fd = -1;
        return 0;
    }
    value = PyLong_AsLong(obj);
    Py_DECREF(obj);
    if (value == -1 && PyErr_Occurred())
        return -1;
    *fd = (int) value;
    return 0;
}

static int read_identity(PyObject *identity, Identity *out)
{
    int64_t dev, ino, nlink;

    if (get_int64(identity, str_dev, &dev) < 0 || get_int64(identity, str_ino, &ino) < 0
        || get_int64(identity, str_size, &out->size) < 0 || get_int64(identity, str_mtime_ns, &out->mtime_ns) < 0
        || get_int64(identity, str_ctime_ns, &out->ctime_ns) < 0 || get_int64(identity, str_nlink, &nlink) < 0)
        return -1;
    out->dev = (dev_t) dev;
    out->ino = (ino_t) ino;
    out->nlink = (nlink_t) nlink;
    return 0;
}

/* Copy owner.log_fds (log index -> fd, -1 for none) into logs */
static int copy_log_fds(PyObject *owner, LogsCore *logs)
{
    PyObject *fds = PyObject_GetAttr(owner, str_log_fds), *seq;
    Py_ssize_t count;

    if (fds == NULL)
        return -1;
    seq = PySequence_Fast(fds, "log_fds must be a sequence");
    Py_DECREF(fds);
    if (seq == NULL)
        return -1;
    count = PySequence_Fast_GET_SIZE(seq);
    if (count > (Py_ssize_t) LOG_CHUNKS * LOG_CHUNK) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many store logs");
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        long fd = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if ((fd == -1 && PyErr_Occurred()) || logs_set(logs, i, fd < 0 ? -1 : (int) fd) < 0) {
            if (!PyErr_Occurred())
                PyErr_NoMemory();
            Py_DECREF(seq);
            return -1;
        }
    }
    /* Slots past the table's end were never used by this file's map; leave them */
    Py_DECREF(seq);
    return 0;
}

/* Copy the owner's state into the view (under its lock) */
static int view_publish(ViewObject *self)
{
    ViewCore *v = self->core;
    PyObject *owner = PyWeakref_GetObject(self->owner);
    PyObject *written, *identity;
    int64_t size, base_limit;
    int base_fd, base_changed, base_in_python;

    if (owner == Py_None)
        return 0; /* gone: nothing to publish */
    Py_INCREF(owner);
    written = PyObject_GetAttr(owner, str_written);
    identity = PyObject_GetAttr(owner, str_base_identity);
    if (written == NULL || identity == NULL)
        goto fail;
    if (!PyObject_TypeCheck(written, &RangeMapType)) {
        PyErr_SetString(PyExc_TypeError, "the owner's map must be a cowfs._native.RangeMap");
        goto fail;
    }
    if (get_int64(owner, str_size, &size) < 0 || get_int64(owner, str_base_limit, &base_limit) < 0
        || get_fd(owner, str_base_fd, &base_fd) < 0)
        goto fail;
    {
        PyObject *changed = PyObject_GetAttr(owner, str_base_changed);
        if (changed == NULL)
            goto fail;
        base_changed = PyObject_IsTrue(changed);
        Py_DECREF(changed);
        if (base_changed < 0)
            goto fail;
    }
    if (self->private_logs && copy_log_fds(owner, v->logs) < 0)
        goto fail;
    {
        PyObject *is_fd = PyObject_GetAttr(owner, str_base_is_fd);
        if (is_fd == NULL)
            goto fail;
        base_in_python = !PyObject_IsTrue(is_fd);
        Py_DECREF(is_fd);
    }
    if (identity != self->identity) {
        if (identity == Py_None) {
            v->has_identity = 0;
        } else {
            if (read_identity(identity, &v->identity) < 0)
                goto fail;
            v->has_identity = 1;
        }
        Py_XSETREF(self->identity, Py_NewRef(identity));
    }
    if (written != self->map) {
        MapCore *old = v->map;
        map_ref(((RangeMapObject *) written)->core);
        v->map = ((RangeMapObject *) written)->core;
        map_unref(old);
        Py_XSETREF(self->map, Py_NewRef(written));
    }
    v->base_in_python = base_in_python;
    v->size = size;
    v->base_limit = base_limit;
    v->base_fd = base_fd;
    v->base_changed = base_changed;
    Py_DECREF(written);
    Py_DECREF(identity);
    Py_DECREF(owner);
    return 0;
fail:
    Py_XDECREF(written);
    Py_XDECREF(identity);
    Py_DECREF(owner);
    return -1;
}

static void view_lock_from_python(ViewCore *v)
{
    if (pthread_mutex_trylock(&v->lock) != 0) {
        Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&v->lock);
        Py_END_ALLOW_THREADS
    }
}

static PyObject *view_enter(ViewObject *self, PyObject *unused)
{
    if (self->depth++ == 0)
        view_lock_from_python(self->core);
    Py_RETURN_NONE;
}

static PyObject *view_exit(ViewObject *self, PyObject *args)
{
    int res;

    if (self->depth <= 0) {
        PyErr_SetString(PyExc_RuntimeError, "the view is not locked");
        return NULL;
    }
    if (--self->depth > 0)
        Py_RETURN_FALSE;
    /* Also when the block raised: what it changed before the error stays changed */
    res = view_publish(self);
    atomic_fetch_add(&self->core->changes, 1);
    pthread_mutex_unlock(&self->core->lock);
    if (res < 0)
        return NULL;
    Py_RETURN_FALSE;
}

static PyObject *view_publish_method(ViewObject *self, PyObject *unused)
{
    int res;

    view_lock_from_python(self->core);
    res = view_publish(self);
    atomic_fetch_add(&self->core->changes, 1);
    pthread_mutex_unlock(&self->core->lock);
    if (res < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *view_get_busy(ViewObject *self, void *unused)
{
    return PyLong_FromLong(atomic_load(&self->core->busy));
}

static PyObject *view_get_base_modified(ViewObject *self, void *unused)
{
    return PyBool_FromLong(atomic_load(&self->core->base_modified));
}

static PyObject *view_get_locked(ViewObject *self, void *unused)
{
    return PyBool_FromLong(self->depth > 0);
}

static PyObject *view_get_published(ViewObject *self, void *unused)
{
    ViewCore *v = self->core;
    PyObject *result;

    view_lock_from_python(v);
    result = Py_BuildValue("{s:L,s:L,s:i,s:O,s:i}", "size", (long long) v->size, "base_limit",
                           (long long) v->base_limit, "base_fd", v->base_fd, "base_changed",
                           v->base_changed ? Py_True : Py_False, "log0_fd", logs_get(v->logs, 0));
    pthread_mutex_unlock(&v->lock);
    return result;
}

static PyMethodDef view_methods[] = {
    {"__enter__", (PyCFunction) view_enter, METH_NOARGS, "take the view's lock (nested: counted)"},
    {"__exit__", (PyCFunction) view_exit, METH_VARARGS, "publish the owner's state and release the lock"},
    {"publish", (PyCFunction) view_publish_method, METH_NOARGS, "publish the owner's state now (takes the lock)"},
    {NULL},
};

static PyGetSetDef view_getset[] = {
    {"busy", (getter) view_get_busy, NULL, "requests that change the file, passed to Python and not replied yet",
     NULL},
    {"base_modified", (getter) view_get_base_modified, NULL, "a cold read found the base modified", NULL},
    {"locked", (getter) view_get_locked, NULL, "the Python thread holds the lock", NULL},
    {"published", (getter) view_get_published, NULL, "what the READ server sees (for tests)", NULL},
    {NULL},
};

static PyTypeObject ViewType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cowfs._native.View",
    .tp_doc = "View(owner, logs=None): one file's state for the READ server, published from owner "
              "(an OverlayFile) whenever the Python thread leaves `with view:`.",
    .tp_basicsize = sizeof(ViewObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = view_new,
    .tp_dealloc = (destructor) view_dealloc,
    .tp_methods = view_methods,
    .tp_getset = view_getset,
};

/* ------------------------------------------------------------------------ */
/* Tables: fh -> handle, ino -> open file, unique -> busy file              */
/* ------------------------------------------------------------------------ */

typedef struct {
    uint64_t key; /* 0: free (no fh, ino or unique is 0) */
    ViewCore *view;
    int value; /* handles: O_DIRECT; inodes: handle count */
} Slot;

typedef struct {
    Slot *slots;
    size_t cap, len; /* cap: a power of two */
} Table;

static pthread_mutex_t tables_lock = PTHREAD_MUTEX_INITIALIZER;
static Table handles, inodes, pending;

static size_t slot_of(const Table *t, uint64_t key)
{
    uint64_t h = key * 0x9E3779B97F4A7C15ull;
    return (size_t) (h >> 32) & (t->cap - 1);
}

static Slot *table_find(Table *t, uint64_t key)
{
    if (t->cap == 0 || key == 0)
        return NULL;
    for (size_t i = slot_of(t, key);; i = (i + 1) & (t->cap - 1)) {
        if (t->slots[i].key == key)
            return &t->slots[i];
        if (t->slots[i].key == 0)
            return NULL;
    }
}

static int table_grow(Table *t)
{
    size_t cap = t->cap ? t->cap * 2 : 64;
    Slot *old = t->slots, *slots = calloc(cap, sizeof(Slot));
    size_t old_cap = t->cap;

    if (slots == NULL)
        return -1;
    t->slots = slots;
    t->cap = cap;
    for (size_t i = 0; i < old_cap; i++) {
        if (old[i].key != 0) {
            size_t j = slot_of(t, old[i].key);
            while (slots[j].key != 0)
                j = (j + 1) & (cap - 1);
            slots[j] = old[i];
        }
    }
    free(old);
    return 0;
}

/* A new slot for key (not in the table), or NULL on no memory */
static Slot *table_insert(Table *t, uint64_t key)
{
    size_t i;

    if ((t->len + 1) * 4 > t->cap * 3 && table_grow(t) < 0)
        return NULL;
    for (i = slot_of(t, key); t->slots[i].key != 0; i = (i + 1) & (t->cap - 1))
        ;
    t->slots[i].key = key;
    t->len++;
    return &t->slots[i];
}

/* Remove a slot, shifting back the ones after it (linear probing, no tombstones) */
static void table_delete(Table *t, Slot *slot)
{
    size_t i = (size_t) (slot - t->slots), j = i;

    for (;;) {
        size_t home;
        j = (j + 1) & (t->cap - 1);
        if (t->slots[j].key == 0)
            break;
        home = slot_of(t, t->slots[j].key);
        /* Move j into the hole at i unless its home lies cyclically in (i, j] */
        if ((i <= j) ? (i < home && home <= j) : (i < home || home <= j))
            continue;
        t->slots[i] = t->slots[j];
        i = j;
    }
    t->slots[i].key = 0;
    t->slots[i].view = NULL;
    t->len--;
}

/* The view of an open fh (a new reference) and whether it is O_DIRECT; NULL if unknown */
static ViewCore *handle_view(uint64_t fh, int *direct)
{
    ViewCore *v = NULL;
    Slot *slot;

    pthread_mutex_lock(&tables_lock);
    slot = table_find(&handles, fh);
    if (slot != NULL) {
        v = slot->view;
        *direct = slot->value;
        view_ref(v);
    }
    pthread_mutex_unlock(&tables_lock);
    return v;
}

/* Mark the open file ino busy until the reply to unique was written */
static void mark_busy(uint64_t ino, uint64_t unique)
{
    Slot *slot, *entry;

    pthread_mutex_lock(&tables_lock);
    slot = table_find(&inodes, ino);
    if (slot != NULL && table_find(&pending, unique) == NULL) {
        entry = table_insert(&pending, unique);
        if (entry != NULL) {
            entry->view = slot->view;
            view_ref(slot->view);
            atomic_fetch_add(&slot->view->busy, 1);
        } else {
            /* No memory to remember it: the file stays busy for good, reads go to Python */
            atomic_fetch_add(&slot->view->busy, 1);
        }
    }
    pthread_mutex_unlock(&tables_lock);
}

/* ------------------------------------------------------------------------ */
/* Counters                                                                 */
/* ------------------------------------------------------------------------ */

static struct {
    atomic_ullong served;       /* READs answered here */
    atomic_ullong served_ns;    /* time from reading the request to the reply */
    atomic_ullong served_bytes;
    atomic_ullong cold;         /* of those, answered by a worker after a disk wait */
    atomic_ullong errors;       /* answered with an error (O_DIRECT alignment, EIO of a cold read) */
    atomic_ullong passed_busy;  /* READs passed to Python: the file was busy */
    atomic_ullong passed_other; /* READs passed to Python: unknown handle, base check, error, ... */
} counts;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t) ts.tv_sec * 1000000000u + (uint64_t) ts.tv_nsec;
}

/* ------------------------------------------------------------------------ */
/* The READ server                                                          */
/* ------------------------------------------------------------------------ */

typedef struct {
    int fd; /* -1: zeros */
    int64_t offset; /* in fd */
    size_t length;
    size_t at; /* in the reply */
} Piece;

/* The pieces of one window of a read (a read may need more than fit) */
typedef struct {
    ViewCore *v;
    int64_t start;   /* of the read: pieces say where they go relative to it */
    int64_t covered; /* the pieces cover the read up to here */
    int count;
    int uses_base;
    Piece pieces[MAX_PIECES];
} Plan;

enum { PLAN_OK = 0, PLAN_FULL = 1, PLAN_NO_FD = 2 };

static int add_piece(Plan *p, int fd, int64_t offset, int64_t start, int64_t end)
{
    Piece *piece;

    if (p->count == MAX_PIECES)
        return PLAN_FULL;
    piece = &p->pieces[p->count++];
    piece->fd = fd;
    piece->offset = offset;
    piece->length = (size_t) (end - start);
    piece->at = (size_t) (start - p->start);
    p->covered = end;
    return PLAN_OK;
}

/* overlay.OverlayFile._pieces, one segment of the map */
static int plan_segment(void *ctx, int64_t start, int64_t end, int64_t store, int mapped)
{
    Plan *p = ctx;
    ViewCore *v = p->v;

    if (mapped) {
        int fd;
        if (store == ZEROS)
            return add_piece(p, -1, 0, start, end);
        fd = logs_get(v->logs, store >> STORE_LOG_SHIFT);
        if (fd < 0)
            return PLAN_NO_FD;
        return add_piece(p, fd, store & (((int64_t) 1 << STORE_LOG_SHIFT) - 1), start, end);
    }
    if (start < v->base_limit) {
        int64_t base_end = end < v->base_limit ? end : v->base_limit;
        int res;
        if (v->base_fd < 0 || v->base_in_python)
            return PLAN_NO_FD;
        res = add_piece(p, v->base_fd, start, start, base_end);
        if (res != PLAN_OK)
            return res;
        p->uses_base = 1;
        start = base_end;
    }
    if (start < end)
        return add_piece(p, -1, 0, start, end);
    return PLAN_OK;
}

/* Under v->lock: the pieces of [from, end) of a read that starts at start, as
   many as fit (PLAN_FULL: up to p->covered) */
static int make_plan(Plan *p, ViewCore *v, int64_t start, int64_t from, int64_t end)
{
    p->v = v;
    p->start = start;
    p->covered = from;
    p->count = 0;
    p->uses_base = 0;
    if (v->map == NULL)
        return plan_segment(p, from, end, 0, 0);
    return map_segments(v->map, from, end, plan_segment, p);
}

/* Under v->lock: has the base changed since the view took it (overlay.BaseIdentity.modified_in)? */
static int base_modified(ViewCore *v)
{
    struct stat st;

    if (!v->has_identity || fstat(v->base_fd, &st) != 0)
        return 1;
    if ((int64_t) st.st_size != v->identity.size
        || (int64_t) st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec != v->identity.mtime_ns)
        return 1;
    return (int64_t) st.st_ctim.tv_sec * 1000000000 + st.st_ctim.tv_nsec != v->identity.ctime_ns
           && st.st_nlink >= v->identity.nlink;
}

enum { READ_OK = 0, READ_COLD = 1, READ_FAILED = 2 };

/* Read the plan's pieces into buf; with nowait, READ_COLD if a byte is not cached */
static int read_pieces(const Plan *p, char *buf, int nowait)
{
    for (int i = 0; i < p->count; i++) {
        const Piece *piece = &p->pieces[i];
        struct iovec iov = {buf + piece->at, piece->length};
        ssize_t got;

        if (piece->fd < 0) {
            memset(buf + piece->at, 0, piece->length);
            continue;
        }
        do
            got = preadv2(piece->fd, &iov, 1, piece->offset, nowait ? RWF_NOWAIT : 0);
        while (got < 0 && errno == EINTR);
        if (got == (ssize_t) piece->length)
            continue;
        if (nowait && (got > 0 || errno == EAGAIN || errno == EOPNOTSUPP)) {
            if (got < 0 && errno == EOPNOTSUPP)
                atomic_store(&p->v->nowait_fails, 1); /* this filesystem cannot: always a worker */
            return READ_COLD;
        }
        return READ_FAILED; /* an error, or a short read (the file shrank under us) */
    }
    return READ_OK;
}

static void send_reply(int fd, uint64_t unique, int error, const char *data, size_t length)
{
    struct fuse_out_header out;
    struct iovec iov[2];
    ssize_t res;

    out.unique = unique;
    out.error = -error;
    out.len = (uint32_t) (sizeof(out) + length);
    iov[0].iov_base = &out;
    iov[0].iov_len = sizeof(out);
    iov[1].iov_base = (void *) data;
    iov[1].iov_len = length;
    do
        res = writev(fd, iov, length ? 2 : 1);
    while (res < 0 && errno == EINTR);
    /* ENOENT: the request was interrupted and is gone; nothing else to do either way */
}

/* A READ waiting for a worker: its disk wait must not stall the reader */
typedef struct Job {
    struct Job *next;
    int fd;
    uint64_t unique;
    int64_t offset;
    size_t size;
    uint64_t started;
    ViewCore *view; /* a reference */
} Job;

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    Job *head, *tail;
    int queued;          /* jobs in the queue, not taken yet */
    int idle, count, stopping;
    pthread_t threads[MAX_WORKERS];
} workers = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static void *worker_main(void *arg);

/* Hand a cold READ to a worker; 0 if none can take it */
static int queue_cold_read(int fd, uint64_t unique, int64_t offset, size_t size, uint64_t started, ViewCore *v)
{
    Job *job = malloc(sizeof(Job));
    int ok = 1;

    if (job == NULL)
        return 0;
    *job = (Job) {NULL, fd, unique, offset, size, started, v};
    pthread_mutex_lock(&workers.lock);
    if (workers.stopping) {
        ok = 0;
    } else if (workers.queued >= workers.idle && workers.count < MAX_WORKERS) {
        /* Every idle worker has a job waiting for it already: one more, so the disk sees them all */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old); /* signals stay with Python's thread */
        if (pthread_create(&workers.threads[workers.count], NULL, worker_main, NULL) == 0)
            workers.count++;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        ok = workers.count > 0;
    }
    if (ok) {
        view_ref(v);
        if (workers.tail)
            workers.tail->next = job;
        else
            workers.head = job;
        workers.tail = job;
        workers.queued++;
        pthread_cond_signal(&workers.wake);
    }
    pthread_mutex_unlock(&workers.lock);
    if (!ok)
        free(job);
    return ok;
}

static void count_served(uint64_t started, size_t length)
{
    atomic_fetch_add_explicit(&counts.served, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&counts.served_bytes, length, memory_order_relaxed);
    atomic_fetch_add_explicit(&counts.served_ns, now_ns() - started, memory_order_relaxed);
}

static char *reader_buffer;

/* Answer a READ from the view state, or return 0 to pass it to Python */
static int serve_read(int fd, const struct fuse_in_header *in, size_t size)
{
    const struct fuse_read_in *arg = (const struct fuse_read_in *) (in + 1);
    static Plan plan; /* only the reader thread serves here */
    uint64_t started = now_ns();
    ViewCore *v;
    int direct, res;
    int64_t offset, end;
    size_t length;

    if (size < sizeof(*in) + offsetof(struct fuse_read_in, read_flags) || arg->size > MAX_READ
        || arg->offset > INT64_MAX - MAX_READ)
        goto pass_other;
    v = handle_view(arg->fh, &direct);
    if (v == NULL)
        goto pass_other;
    if (direct && (arg->offset | arg->size) % DIRECT_IO_ALIGNMENT) {
        /* As fuse_ops.read: an O_DIRECT read must be aligned to 512 bytes */
        view_unref(v);
        send_reply(fd, in->unique, EINVAL, NULL, 0);
        atomic_fetch_add(&counts.errors, 1);
        count_served(started, 0);
        return 1;
    }
    if (atomic_load(&v->busy)) {
        view_unref(v);
        atomic_fetch_add_explicit(&counts.passed_busy, 1, memory_order_relaxed);
        return 0;
    }
    if (reader_buffer == NULL && (reader_buffer = malloc(MAX_READ)) == NULL)
        goto pass_view;
    offset = (int64_t) arg->offset;
    pthread_mutex_lock(&v->lock);
    if (v->base_changed || atomic_load(&v->base_modified)) {
        pthread_mutex_unlock(&v->lock); /* Python answers: EIO where the base is read */
        goto pass_view;
    }
    end = offset + arg->size < v->size ? offset + arg->size : v->size;
    length = end > offset ? (size_t) (end - offset) : 0;
    if (length == 0) {
        pthread_mutex_unlock(&v->lock);
        view_unref(v);
        send_reply(fd, in->unique, 0, NULL, 0);
        count_served(started, 0);
        return 1;
    }
    if (make_plan(&plan, v, offset, offset, end) != PLAN_OK || (plan.uses_base && base_modified(v))) {
        pthread_mutex_unlock(&v->lock); /* too many pieces, or Python checks again, logs and answers EIO */
        goto pass_view;
    }
    res = atomic_load(&v->nowait_fails) ? READ_COLD : read_pieces(&plan, reader_buffer, 1);
    pthread_mutex_unlock(&v->lock);
    if (res == READ_COLD && v->base_in_python)
        goto pass_view; /* a worker could not hand a read that comes to need its base to Python */
    if (res == READ_COLD) {
        if (!queue_cold_read(fd, in->unique, offset, arg->size, started, v))
            goto pass_view;
        view_unref(v);
        return 1;
    }
    if (res != READ_OK)
        goto pass_view; /* Python gets the same error, and logs it */
    view_unref(v);
    send_reply(fd, in->unique, 0, reader_buffer, length);
    count_served(started, length);
    return 1;

pass_view:
    view_unref(v);
pass_other:
    atomic_fetch_add_explicit(&counts.passed_other, 1, memory_order_relaxed);
    return 0;
}

/* Under v->lock: plan a window of a cold read and check the base as Python would;
   0, or the errno to answer with */
static int plan_cold(Plan *plan, ViewCore *v, int64_t start, int64_t from, int64_t end)
{
    int res = make_plan(plan, v, start, from, end);

    if (res == PLAN_NO_FD)
        return EIO; /* closed meanwhile: the mount is going away */
    if (plan->uses_base && (v->base_changed || atomic_load(&v->base_modified)))
        return EIO;
    if (plan->uses_base && base_modified(v)) {
        atomic_store(&v->base_modified, 1); /* from now on Python answers: it finds the change and logs it */
        return EIO;
    }
    return 0;
}

/* Under v->lock: the reply's length for a read of size at offset */
static size_t cold_length(ViewCore *v, const Job *job)
{
    int64_t end = job->offset + (int64_t) job->size;

    if (end > v->size)
        end = v->size;
    return end > job->offset ? (size_t) (end - job->offset) : 0;
}

/* Under v->lock: read the whole job (window by window) into buf */
static int read_locked(const Job *job, Plan *plan, char *buf, size_t length, int nowait)
{
    int64_t end = job->offset + (int64_t) length;

    for (int64_t from = job->offset; from < end; from = plan->covered) {
        int res = plan_cold(plan, job->view, job->offset, from, end);
        if (res != 0)
            return res;
        res = read_pieces(plan, buf, nowait);
        if (res == READ_COLD)
            return -1;
        if (res != READ_OK)
            return EIO;
    }
    return 0;
}

/* Dup the fds of a plan's pieces (each fd once); -1 if one fails (nothing then stays dup'd) */
static int dup_fds(Plan *plan)
{
    int original[MAX_PIECES], copy[MAX_PIECES], n = 0;

    for (int i = 0; i < plan->count; i++) {
        int fd = plan->pieces[i].fd, k;
        if (fd < 0)
            continue;
        for (k = 0; k < n && original[k] != fd; k++)
            ;
        if (k == n) {
            copy[n] = fcntl(fd, F_DUPFD_CLOEXEC, 0);
            if (copy[n] < 0) {
                for (int j = 0; j < n; j++)
                    close(copy[j]);
                return -1;
            }
            original[n++] = fd;
        }
        plan->pieces[i].fd = copy[k];
    }
    return 0;
}

static void close_fds(const Plan *plan)
{
    for (int i = 0; i < plan->count; i++) {
        int fd = plan->pieces[i].fd, seen = 0;
        if (fd < 0)
            continue;
        for (int k = 0; k < i && !seen; k++)
            seen = plan->pieces[k].fd == fd;
        if (!seen)
            close(fd);
    }
}

/* A worker's READ: wait for the disk without the lock, through dup()s of the
   view's fds, into buf; then, under the lock, keep those bytes if nothing
   changed meanwhile, else read them again (cached now).  0 with *length, or
   an errno. */
static int serve_cold(const Job *job, char *buf, Plan *plan, size_t *length)
{
    ViewCore *v = job->view;
    int res = 0;

    for (int attempt = 0; attempt < COLD_ATTEMPTS; attempt++) {
        unsigned long long seen;
        int64_t from, end;
        int stale = 0;

        pthread_mutex_lock(&v->lock);
        *length = cold_length(v, job);
        seen = atomic_load(&v->changes);
        end = job->offset + (int64_t) *length;
        /* Window by window, holding the lock only to plan and dup; held after the loop */
        for (from = job->offset; from < end && !stale; from = plan->covered) {
            int ok;
            res = plan_cold(plan, v, job->offset, from, end);
            if (res != 0) {
                pthread_mutex_unlock(&v->lock);
                return res;
            }
            if (dup_fds(plan) != 0) {
                res = -1;
                break;
            }
            pthread_mutex_unlock(&v->lock);
            ok = read_pieces(plan, buf, 0) == READ_OK;
            close_fds(plan);
            pthread_mutex_lock(&v->lock);
            if (!ok) {
                res = -1;
                break;
            }
            stale = atomic_load(&v->changes) != seen;
        }
        if (res != 0) {
            pthread_mutex_unlock(&v->lock);
            break; /* read under the lock below, as Python would, and get its error */
        }
        if (!stale) {
            pthread_mutex_unlock(&v->lock);
            return 0;
        }
        /* Changed meanwhile: the bytes read may be stale, but they are cached now */
        *length = cold_length(v, job);
        res = atomic_load(&v->nowait_fails) ? -1 : read_locked(job, plan, buf, *length, 1);
        pthread_mutex_unlock(&v->lock);
        if (res >= 0)
            return res;
        res = 0; /* not cached after all: again */
    }
    /* Last resort: wait for the disk under the lock (Python's changes of this file wait too) */
    pthread_mutex_lock(&v->lock);
    *length = cold_length(v, job);
    res = read_locked(job, plan, buf, *length, 0);
    pthread_mutex_unlock(&v->lock);
    return res;
}

static void *worker_main(void *arg)
{
    char *buf = malloc(MAX_READ);
    Plan *plan = malloc(sizeof(Plan));

    for (;;) {
        Job *job;
        size_t length = 0;
        int error;

        pthread_mutex_lock(&workers.lock);
        workers.idle++;
        while (workers.head == NULL && !workers.stopping)
            pthread_cond_wait(&workers.wake, &workers.lock);
        workers.idle--;
        job = workers.head;
        if (job == NULL) { /* stopping, nothing left */
            pthread_mutex_unlock(&workers.lock);
            break;
        }
        workers.head = job->next;
        if (workers.head == NULL)
            workers.tail = NULL;
        workers.queued--;
        pthread_mutex_unlock(&workers.lock);

        error = buf != NULL && plan != NULL ? serve_cold(job, buf, plan, &length) : ENOMEM;
        send_reply(job->fd, job->unique, error, buf, error ? 0 : length);
        if (error)
            atomic_fetch_add(&counts.errors, 1);
        atomic_fetch_add(&counts.cold, 1);
        count_served(job->started, error ? 0 : length);
        view_unref(job->view);
        free(job);
    }
    free(buf);
    free(plan);
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* The request filter (pyfuse3 patch 0005)                                  */
/* ------------------------------------------------------------------------ */

#define PYFUSE3_REQUEST_FILTER_CAPSULE "pyfuse3.request_filter"

struct pyfuse3_request_filter {
    unsigned int version; /* 1 */
    void *data;
    int (*filter)(void *data, int fd, const void *request, size_t size);
    void (*replied)(void *data, uint64_t unique);
    void (*stop)(void *data);
};

static int filter_request(void *data, int fd, const void *request, size_t size)
{
    const struct fuse_in_header *in = request;
    const void *arg = in + 1;
    size_t arg_size = size - sizeof(*in);

    switch (in->opcode) {
    case FUSE_READ:
        return serve_read(fd, in, size);
    case FUSE_WRITE:
    case FUSE_FALLOCATE:
        mark_busy(in->nodeid, in->unique);
        break;
    case FUSE_SETATTR:
        if (arg_size >= sizeof(struct fuse_setattr_in)
            && (((const struct fuse_setattr_in *) arg)->valid & FATTR_SIZE))
            mark_busy(in->nodeid, in->unique);
        break;
    case FUSE_COPY_FILE_RANGE:
        if (arg_size >= sizeof(struct fuse_copy_file_range_in))
            mark_busy(((const struct fuse_copy_file_range_in *) arg)->nodeid_out, in->unique);
        break;
    case FUSE_OPEN:
        if (arg_size >= sizeof(struct fuse_open_in) && (((const struct fuse_open_in *) arg)->flags & O_TRUNC))
            mark_busy(in->nodeid, in->unique);
        break;
    default:
        break;
    }
    return 0;
}

static void filter_replied(void *data, uint64_t unique)
{
    Slot *slot;
    ViewCore *v = NULL;

    pthread_mutex_lock(&tables_lock);
    slot = table_find(&pending, unique);
    if (slot != NULL) {
        v = slot->view;
        table_delete(&pending, slot);
    }
    pthread_mutex_unlock(&tables_lock);
    if (v != NULL) {
        atomic_fetch_sub(&v->busy, 1);
        view_unref(v);
    }
}

/* pyfuse3 calls this after its reader ended, before the fd closes: the workers
   answer what they hold and end. */
static void filter_stop(void *data)
{
    pthread_mutex_lock(&workers.lock);
    workers.stopping = 1;
    pthread_cond_broadcast(&workers.wake);
    pthread_mutex_unlock(&workers.lock);
    for (int i = 0; i < workers.count; i++)
        pthread_join(workers.threads[i], NULL);
    pthread_mutex_lock(&workers.lock);
    workers.count = 0;
    workers.stopping = 0;
    pthread_mutex_unlock(&workers.lock);
    free(reader_buffer);
    reader_buffer = NULL;
}

static const struct pyfuse3_request_filter the_filter = {
    1, NULL, filter_request, filter_replied, filter_stop,
};

/* ------------------------------------------------------------------------ */
/* Module functions                                                         */
/* ------------------------------------------------------------------------ */

static PyObject *native_request_filter(PyObject *module, PyObject *unused)
{
    return PyCapsule_New((void *) &the_filter, PYFUSE3_REQUEST_FILTER_CAPSULE, NULL);
}

static PyObject *native_register_handle(PyObject *module, PyObject *args)
{
    unsigned long long fh, ino;
    PyObject *view;
    int direct;
    Slot *slot;
    ViewCore *v;

    if (!PyArg_ParseTuple(args, "KKO!p:register_handle", &fh, &ino, &ViewType, &view, &direct))
        return NULL;
    if (fh == 0 || ino == 0)
        return PyErr_Format(PyExc_ValueError, "handle and inode must not be 0");
    v = ((ViewObject *) view)->core;
    pthread_mutex_lock(&tables_lock);
    if (table_find(&handles, fh) != NULL) {
        pthread_mutex_unlock(&tables_lock);
        return PyErr_Format(PyExc_ValueError, "handle %llu is registered already", fh);
    }
    slot = table_find(&inodes, ino);
    if (slot != NULL && slot->view != v) {
        pthread_mutex_unlock(&tables_lock);
        return PyErr_Format(PyExc_ValueError, "inode %llu has another view", ino);
    }
    if (slot == NULL) {
        slot = table_insert(&inodes, ino);
        if (slot == NULL)
            goto no_memory;
        slot->view = v;
        slot->value = 0;
        view_ref(v);
    }
    slot->value++;
    slot = table_insert(&handles, fh);
    if (slot == NULL) {
        Slot *inode = table_find(&inodes, ino);
        if (--inode->value == 0) {
            table_delete(&inodes, inode);
            view_unref(v);
        }
        goto no_memory;
    }
    slot->view = v;
    slot->value = direct;
    view_ref(v);
    pthread_mutex_unlock(&tables_lock);
    Py_RETURN_NONE;
no_memory:
    pthread_mutex_unlock(&tables_lock);
    return PyErr_NoMemory();
}

static PyObject *native_unregister_handle(PyObject *module, PyObject *args)
{
    unsigned long long fh, ino;
    Slot *slot;
    ViewCore *released[2] = {NULL, NULL};

    if (!PyArg_ParseTuple(args, "KK:unregister_handle", &fh, &ino))
        return NULL;
    pthread_mutex_lock(&tables_lock);
    slot = table_find(&handles, fh);
    if (slot != NULL) {
        released[0] = slot->view;
        table_delete(&handles, slot);
        slot = table_find(&inodes, ino);
        if (slot != NULL && --slot->value == 0) {
            released[1] = slot->view;
            table_delete(&inodes, slot);
        }
    }
    pthread_mutex_unlock(&tables_lock);
    view_unref(released[0]);
    view_unref(released[1]);
    Py_RETURN_NONE;
}

static PyObject *native_counters(PyObject *module, PyObject *unused)
{
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "served", atomic_load(&counts.served), "served_ns",
                         atomic_load(&counts.served_ns), "served_bytes", atomic_load(&counts.served_bytes), "cold",
                         atomic_load(&counts.cold), "errors", atomic_load(&counts.errors), "passed_busy",
                         atomic_load(&counts.passed_busy), "passed_other", atomic_load(&counts.passed_other));
}

static PyObject *native_reset_counters(PyObject *module, PyObject *unused)
{
    atomic_store(&counts.served, 0);
    atomic_store(&counts.served_ns, 0);
    atomic_store(&counts.served_bytes, 0);
    atomic_store(&counts.cold, 0);
    atomic_store(&counts.errors, 0);
    atomic_store(&counts.passed_busy, 0);
    atomic_store(&counts.passed_other, 0);
    Py_RETURN_NONE;
}

static PyObject *native_tables(PyObject *module, PyObject *unused)
{
    size_t sizes[3];
    int threads;

    pthread_mutex_lock(&tables_lock);
    sizes[0] = handles.len;
    sizes[1] = inodes.len;
    sizes[2] = pending.len;
    pthread_mutex_unlock(&tables_lock);
    pthread_mutex_lock(&workers.lock);
    threads = workers.count;
    pthread_mutex_unlock(&workers.lock);
    return Py_BuildValue("{s:n,s:n,s:n,s:i}", "handles", (Py_ssize_t) sizes[0], "inodes", (Py_ssize_t) sizes[1],
                         "pending", (Py_ssize_t) sizes[2], "workers", threads);
}

static PyMethodDef native_functions[] = {
    {"request_filter", native_request_filter, METH_NOARGS,
     "request_filter() -> capsule: the READ server, for pyfuse3.set_request_filter()"},
    {"register_handle", native_register_handle, METH_VARARGS,
     "register_handle(fh, ino, view, direct): READs of fh are served from view (O_DIRECT rules if direct)"},
    {"unregister_handle", native_unregister_handle, METH_VARARGS,
     "unregister_handle(fh, ino): fh was released"},
    {"counters", native_counters, METH_NOARGS, "counters() -> dict: what the READ server did"},
    {"reset_counters", native_reset_counters, METH_NOARGS, "reset_counters(): start counting from zero"},
    {"tables", native_tables, METH_NOARGS, "tables() -> dict: sizes of the handle, inode and pending tables, and the worker threads running"},
    {NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cowfs._native",
    .m_doc = "The compiled read path of cowfs (see the source's header).",
    .m_size = -1,
    .m_methods = native_functions,
};

PyMODINIT_FUNC PyInit__native(void)
{
    PyObject *m;

#define INTERN(var, text)                                   \
    if ((var = PyUnicode_InternFromString(text)) == NULL)   \
        return NULL;
    INTERN(str_size, "size");
    INTERN(str_base_limit, "base_limit");
    INTERN(str_base_fd, "base_fd");
    INTERN(str_base_changed, "base_changed");
    INTERN(str_base_identity, "base_identity");
    INTERN(str_written, "written");
    INTERN(str_log_fds, "log_fds");
    INTERN(str_base_is_fd, "base_is_fd");
    INTERN(str_dev, "dev");
    INTERN(str_ino, "ino");
    INTERN(str_mtime_ns, "mtime_ns");
    INTERN(str_ctime_ns, "ctime_ns");
    INTERN(str_nlink, "nlink");
    if (PyType_Ready(&RangeMapType) < 0 || PyType_Ready(&StoreLogsType) < 0 || PyType_Ready(&ViewType) < 0)
        return NULL;
    m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "RangeMap", (PyObject *) &RangeMapType) < 0
        || PyModule_AddObjectRef(m, "StoreLogs", (PyObject *) &StoreLogsType) < 0
        || PyModule_AddObjectRef(m, "View", (PyObject *) &ViewType) < 0
        || PyModule_AddIntConstant(m, "BUCKET_SHIFT", BUCKET_SHIFT) < 0
        || PyModule_AddIntConstant(m, "ZEROS", ZEROS) < 0
        || PyModule_AddIntConstant(m, "STORE_LOG_SHIFT", STORE_LOG_SHIFT) < 0
        || PyModule_AddIntConstant(m, "FILTER_VERSION", 1) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
