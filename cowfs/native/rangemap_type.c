/*
 * RangeMap, the Python type over the map's C core (rangemap.c): the API and
 * the semantics of cowfs/rangemap.py, run through the same tests.
 *
 * Its methods run on the Python thread with the GIL; they change a file's
 * map only under the file's view lock (OverlayFile keeps that rule), which
 * is what the READ server takes to walk it.
 */
#include "native.h"

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

/* Append (start, end) to a list; -1 on error */
static int append_span(PyObject *list, int64_t start, int64_t end)
{
    PyObject *item = Py_BuildValue("(LL)", (long long) start, (long long) end);
    int res;

    if (item == NULL)
        return -1;
    res = PyList_Append(list, item);
    Py_DECREF(item);
    return res;
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
        if (pending && append_span(list, p_start, p_end) < 0) {
            Py_DECREF(list);
            return NULL;
        }
        pending = 1;
        p_start = key << BUCKET_SHIFT;
        p_end = (key + 1) << BUCKET_SHIFT;
    }
    if (pending && append_span(list, p_start, p_end) < 0) {
        Py_DECREF(list);
        return NULL;
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

PyTypeObject RangeMapType = {
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
