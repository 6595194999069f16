/*
 * Kernel cache invalidations (FUSE_NOTIFY_INVAL_ENTRY and _INODE) written to
 * the FUSE session's fd, a whole batch without the GIL.  pyfuse3's
 * invalidate_entry() and invalidate_inode() take the GIL back after each
 * notification; while the event loop serves the FORGETs a reset sets off,
 * two thirds of a 100,000-name batch's time went to waiting for it.
 *
 * The session fd is the one the request filter reads (readserver.c tells it
 * here); it is used only under fd_lock, and the filter's stop forgets it
 * under the same lock, so a batch never writes to an fd closed meanwhile.
 */
#include "native.h"

#include <errno.h>
#include <linux/fuse.h>
#include <string.h>
#include <sys/uio.h>

static pthread_mutex_t fd_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_int session_fd = -1;

void notify_remember_fd(int fd)
{
    if (atomic_load_explicit(&session_fd, memory_order_relaxed) == fd)
        return;
    pthread_mutex_lock(&fd_lock);
    atomic_store(&session_fd, fd);
    pthread_mutex_unlock(&fd_lock);
}

void notify_forget_fd(void)
{
    notify_remember_fd(-1);
}

typedef struct {
    uint64_t parent;
    const char *name;
    Py_ssize_t length;
} Entry;

/* One notification; 0 when the kernel took it or did not hold what it names
   (ENOENT), else the errno */
static int send_notification(int fd, int code, const void *arg, size_t arg_size, const char *name, size_t length)
{
    struct fuse_out_header out;
    struct iovec iov[4] = {
        {&out, sizeof out}, {(void *) arg, arg_size}, {(void *) name, length}, {(void *) "", 1},
    };
    int count = name != NULL ? 4 : 2;
    size_t total = sizeof out + arg_size + (name != NULL ? length + 1 : 0);

    out.len = (uint32_t) total;
    out.error = code; /* a notification: the code in error, unique 0 */
    out.unique = 0;
    for (;;) {
        if (writev(fd, iov, count) >= 0 || errno == ENOENT)
            return 0;
        if (errno != EINTR)
            return errno;
    }
}

static int send_all(int fd, const Entry *entries, Py_ssize_t entry_count, const uint64_t *inodes,
                    Py_ssize_t inode_count)
{
    int failed = 0;

    for (Py_ssize_t i = 0; i < entry_count; i++) {
        struct fuse_notify_inval_entry_out arg = {entries[i].parent, (uint32_t) entries[i].length, 0};
        if (send_notification(fd, FUSE_NOTIFY_INVAL_ENTRY, &arg, sizeof arg, entries[i].name,
                              (size_t) entries[i].length)
            != 0)
            failed++;
    }
    for (Py_ssize_t i = 0; i < inode_count; i++) {
        struct fuse_notify_inval_inode_out arg = {inodes[i], 0, 0}; /* attributes and every page */
        if (send_notification(fd, FUSE_NOTIFY_INVAL_INODE, &arg, sizeof arg, NULL, 0) != 0)
            failed++;
    }
    return failed;
}

PyObject *native_invalidate(PyObject *module, PyObject *args)
{
    PyObject *entry_arg, *inode_arg, *entry_items = NULL, *inode_items = NULL, *result = NULL;
    Entry *entries = NULL;
    uint64_t *inodes = NULL;
    Py_ssize_t entry_count, inode_count;
    int fd = -1, failed = 0;

    if (!PyArg_ParseTuple(args, "OO|i", &entry_arg, &inode_arg, &fd))
        return NULL;
    /* Tuples: they hold the names' bytes objects, whose buffers are read without the GIL */
    entry_items = PySequence_Tuple(entry_arg);
    inode_items = entry_items != NULL ? PySequence_Tuple(inode_arg) : NULL;
    if (inode_items == NULL)
        goto done;
    entry_count = PyTuple_GET_SIZE(entry_items);
    inode_count = PyTuple_GET_SIZE(inode_items);
    entries = PyMem_RawMalloc(sizeof *entries * (size_t) (entry_count ? entry_count : 1));
    inodes = PyMem_RawMalloc(sizeof *inodes * (size_t) (inode_count ? inode_count : 1));
    if (entries == NULL || inodes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < entry_count; i++) {
        PyObject *parent;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(entry_items, i), "Oy#", &parent, &entries[i].name,
                              &entries[i].length))
            goto done;
        entries[i].parent = PyLong_AsUnsignedLongLong(parent); /* (OverflowError below 0) */
        if (entries[i].parent == (uint64_t) -1 && PyErr_Occurred())
            goto done;
        if (entries[i].length > UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "a name too long to name");
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < inode_count; i++) {
        inodes[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(inode_items, i));
        if (inodes[i] == (uint64_t) -1 && PyErr_Occurred())
            goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&fd_lock);
    if (fd < 0)
        fd = atomic_load(&session_fd);
    if (fd >= 0)
        failed = send_all(fd, entries, entry_count, inodes, inode_count);
    pthread_mutex_unlock(&fd_lock);
    Py_END_ALLOW_THREADS
    result = fd >= 0 ? PyLong_FromLong(failed) : Py_NewRef(Py_None);
done:
    PyMem_RawFree(entries);
    PyMem_RawFree(inodes);
    Py_XDECREF(entry_items);
    Py_XDECREF(inode_items);
    return result;
}
