/*
 * The range map's C core: view ranges -> store offset or ZEROS, in 64 MiB
 * buckets (the layout of cowfs/rangemap.py), and snapshots that share
 * buckets copy-on-write.
 *
 * Who changes it: the Python thread, through RangeMap (rangemap_type.c), and
 * for a file's map only under that file's view lock.  The READ server and
 * the cold-read workers only walk a map (map_segments), under the same lock.
 * Memory comes from PyMem_Raw*: thread-safe without the GIL.
 */
#include "native.h"

#include <string.h>

/* Memory from PyMem_Raw*: thread-safe without the GIL, and tracemalloc sees it */

MapCore *map_new(void)
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

void map_clear(MapCore *m)
{
    for (Py_ssize_t i = 0; i < m->count; i++)
        bucket_unref(m->buckets[i]);
    PyMem_RawFree(m->buckets);
    m->buckets = NULL;
    m->count = m->cap = 0;
    m->total = m->zeroed = 0;
}

void map_ref(MapCore *m)
{
    atomic_fetch_add(&m->refs, 1);
}

void map_unref(MapCore *m)
{
    if (m != NULL && atomic_fetch_sub(&m->refs, 1) == 1) {
        map_clear(m);
        PyMem_RawFree(m);
    }
}

/* First index i with a[i] > x */
Py_ssize_t bisect_right(const int64_t *a, Py_ssize_t n, int64_t x)
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
    cap = b->cap ? b->cap : 1; /* most files have a range or two: grow from one */
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
        Py_ssize_t cap = m->cap ? m->cap * 2 : 1; /* most files use one bucket */
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
int continues(int64_t start, int64_t end, int64_t store, int64_t next_store)
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
int map_add(MapCore *m, int64_t start, int64_t end, int64_t store, int64_t *added)
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
int64_t map_remove(MapCore *m, int64_t start, int64_t end)
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

int64_t map_last_end(const MapCore *m)
{
    const Bucket *b;
    if (m->count == 0)
        return 0;
    b = m->buckets[m->count - 1];
    return b->ends[b->len - 1];
}

/* A map with the same ranges, sharing every bucket (NULL on no memory) */
MapCore *map_snapshot(const MapCore *m)
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

/* As rangemap.RangeMap.segments(): consecutive pieces of [start, end), each
   wholly inside the map or outside it.  Return what fn returned to stop, or 0. */
int map_segments(const MapCore *m, int64_t start, int64_t end, segment_fn fn, void *ctx)
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
