/*
 * View: one file's state as the READ server sees it -- size, base_limit,
 * base fd and identity, range map, store logs -- and the file's lock.
 *
 * Who changes it: only the Python thread, and only while it holds the lock
 * (``with view:``); leaving the lock publishes the owner's state here.  The
 * READ server and the workers read it under the same lock, so a READ sees
 * the state before or after a change, never a mix.  busy, nowait_fails and
 * base_modified are atomics the other threads set without the lock.
 */
#include "native.h"

void view_ref(ViewCore *v)
{
    atomic_fetch_add(&v->refs, 1);
}

void view_unref(ViewCore *v)
{
    if (v != NULL && atomic_fetch_sub(&v->refs, 1) == 1) {
        pthread_mutex_destroy(&v->lock);
        map_unref(v->map);
        logs_unref(v->logs);
        PyMem_RawFree(v);
    }
}

static PyObject *str_size, *str_base_limit, *str_base_fd, *str_base_changed, *str_base_identity, *str_written,
    *str_log_fds, *str_base_is_fd, *str_dev, *str_ino, *str_mtime_ns, *str_ctime_ns, *str_nlink;

int view_init_names(void)
{
#define INTERN(var, text)                                   \
    if ((var = PyUnicode_InternFromString(text)) == NULL)   \
        return -1;
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
#undef INTERN
    return 0;
}

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
        logs_ref(v->logs);
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
/* The owner (a new reference); NULL if it is gone, with an exception set only on an error */
static PyObject *view_owner(ViewObject *self)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *owner;

    if (PyWeakref_GetRef(self->owner, &owner) < 0)
        return NULL;
    return owner;
#else
    PyObject *owner = PyWeakref_GetObject(self->owner); /* borrowed; deprecated from 3.13 on */

    return owner == NULL || owner == Py_None ? NULL : Py_NewRef(owner);
#endif
}

static int view_publish(ViewObject *self)
{
    ViewCore *v = self->core;
    PyObject *owner = view_owner(self);
    PyObject *written, *identity;
    int64_t size, base_limit;
    int base_fd, base_changed, base_in_python;

    if (owner == NULL)
        return PyErr_Occurred() ? -1 : 0; /* gone: nothing to publish */
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

/* Publish, count the change, and let the READ thread in again (the caller holds the lock) */
static int view_publish_and_unlock(ViewObject *self)
{
    int res = view_publish(self);

    atomic_fetch_add(&self->core->changes, 1);
    pthread_mutex_unlock(&self->core->lock);
    return res;
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
    res = view_publish_and_unlock(self);
    if (res < 0)
        return NULL;
    Py_RETURN_FALSE;
}

static PyObject *view_publish_method(ViewObject *self, PyObject *unused)
{
    int res;

    view_lock_from_python(self->core);
    res = view_publish_and_unlock(self);
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

PyTypeObject ViewType = {
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
