/*
 * Store logs: a table log index -> fd, through which the READ server
 * resolves a store offset ``log << 44 | offset_in_log``; and StoreLogs, the
 * Python type over one table.
 *
 * Who changes it: the Python thread (one writer, with the GIL).  A view's own
 * table is changed only under the view's lock (view.c copies owner.log_fds
 * into it when it publishes); a shared StoreLogs only under the lock of every
 * view that uses it.  The READ server reads entries under a view's lock, and
 * every entry is an atomic, so a reader never sees a torn fd.
 *
 * Memory: the first LOGS_INLINE logs are held in place (a store has a
 * handful), so a file's table costs a few dozen bytes; the 512-chunk table
 * for the others is allocated only when one of them gets an fd.
 */
#include "native.h"

/* Memory from PyMem_Raw*: thread-safe without the GIL */

LogsCore *logs_new(void)
{
    LogsCore *l = PyMem_RawMalloc(sizeof(LogsCore));

    if (l == NULL)
        return NULL;
    atomic_init(&l->refs, 1);
    for (int i = 0; i < LOGS_INLINE; i++)
        atomic_init(&l->first[i], -1);
    atomic_init(&l->more, NULL);
    return l;
}

void logs_ref(LogsCore *l)
{
    atomic_fetch_add(&l->refs, 1);
}

void logs_unref(LogsCore *l)
{
    LogsMore *more;

    if (l == NULL || atomic_fetch_sub(&l->refs, 1) != 1)
        return;
    more = atomic_load(&l->more);
    if (more != NULL) {
        for (int i = 0; i < LOG_CHUNKS; i++)
            PyMem_RawFree(atomic_load(&more->chunks[i]));
        PyMem_RawFree(more);
    }
    PyMem_RawFree(l);
}

/* The fd of a log, or -1 */
int logs_get(LogsCore *l, int64_t index)
{
    LogsMore *more;
    atomic_int *chunk;

    if (index >= 0 && index < LOGS_INLINE)
        return atomic_load_explicit(&l->first[index], memory_order_relaxed);
    if (index < 0 || index >= (int64_t) LOG_CHUNKS * LOG_CHUNK)
        return -1;
    more = atomic_load_explicit(&l->more, memory_order_acquire);
    if (more == NULL)
        return -1;
    chunk = atomic_load_explicit(&more->chunks[index / LOG_CHUNK], memory_order_acquire);
    return chunk == NULL ? -1 : atomic_load_explicit(&chunk[index % LOG_CHUNK], memory_order_relaxed);
}

/* With the GIL (one writer); -1 on no memory */
int logs_set(LogsCore *l, int64_t index, int fd)
{
    LogsMore *more;
    atomic_int *chunk;

    if (index < LOGS_INLINE) {
        atomic_store_explicit(&l->first[index], fd, memory_order_relaxed);
        return 0;
    }
    more = atomic_load(&l->more);
    if (more == NULL) {
        if (fd < 0)
            return 0;
        more = PyMem_RawMalloc(sizeof(LogsMore));
        if (more == NULL)
            return -1;
        for (int i = 0; i < LOG_CHUNKS; i++)
            atomic_init(&more->chunks[i], NULL);
        atomic_store_explicit(&l->more, more, memory_order_release);
    }
    chunk = atomic_load(&more->chunks[index / LOG_CHUNK]);
    if (chunk == NULL) {
        if (fd < 0)
            return 0;
        chunk = PyMem_RawMalloc(LOG_CHUNK * sizeof(atomic_int));
        if (chunk == NULL)
            return -1;
        for (int i = 0; i < LOG_CHUNK; i++)
            atomic_init(&chunk[i], -1);
        atomic_store_explicit(&more->chunks[index / LOG_CHUNK], chunk, memory_order_release);
    }
    atomic_store_explicit(&chunk[index % LOG_CHUNK], fd, memory_order_relaxed);
    return 0;
}

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

PyTypeObject StoreLogsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cowfs._native.StoreLogs",
    .tp_doc = "Store log index -> fd, as the READ server resolves store offsets (log << 44 | offset).",
    .tp_basicsize = sizeof(StoreLogsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = storelogs_new,
    .tp_dealloc = (destructor) storelogs_dealloc,
    .tp_methods = storelogs_methods,
};
