/*
 * The module cowfs._native: its functions and its init.  It owns no state of
 * its own: the types and the READ server live in the other files of this
 * directory (native.h says which owns what).
 */
#include "native.h"

static PyObject *native_tables(PyObject *module, PyObject *unused)
{
    size_t handle_count, inode_count, pending_count;

    handles_sizes(&handle_count, &inode_count, &pending_count);
    return Py_BuildValue("{s:n,s:n,s:n,s:i}", "handles", (Py_ssize_t) handle_count, "inodes",
                         (Py_ssize_t) inode_count, "pending", (Py_ssize_t) pending_count, "workers",
                         workers_running());
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
    {"invalidate", native_invalidate, METH_VARARGS,
     "invalidate(entries, inodes, fd=-1) -> int | None: tell the kernel to forget the names (parent, name) and "
     "the inodes' attributes and pages, all without the GIL; how many failed (not ENOENT), None when no session "
     "fd is known yet (fd: write there instead)"},
    {"forgets_fd", native_forgets_fd, METH_NOARGS,
     "forgets_fd() -> int: an eventfd, readable while FORGETs wait in take_forgets(); from the first call on, "
     "the request filter gathers FORGET and BATCH_FORGET instead of passing them on"},
    {"take_forgets", native_take_forgets, METH_NOARGS,
     "take_forgets() -> bytes: the FORGETs gathered since the last call, as native uint64 inode, count, inode, count, ..."},
    {"tables", native_tables, METH_NOARGS, "tables() -> dict: sizes of the handle, inode and pending tables, and the worker threads running"},
    {NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cowfs._native",
    .m_doc = "The compiled read path of cowfs (see native.h in its sources).",
    .m_size = -1,
    .m_methods = native_functions,
};

PyMODINIT_FUNC PyInit__native(void)
{
    PyObject *m;

    if (view_init_names() < 0 || forgets_init() < 0)
        return NULL;
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
