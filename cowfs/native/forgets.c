/*
 * FORGETs gathered on the request filter's thread.  When the kernel drops
 * many names from its caches (after a reset of 200,000 names), it sends the
 * FORGETs as the inodes go: 31,114 requests of a median 3 inodes for 150,000
 * inodes, measured.  Through pyfuse3 each is a trip through the session loop,
 * and a request of a program queues behind all of them: it waited up to half
 * a second.  Once Python asks for the eventfd (forgets_fd()), the filter takes
 * FORGET and BATCH_FORGET here (they have no reply), adds their (inode, count)
 * pairs to one list, and the eventfd is readable while the list is not empty;
 * Python takes the whole list at once (take_forgets(), as native-endian
 * uint64 inode, count, inode, count, ...).  Lookup counts only
 * go down by what the kernel forgot, so applying them late is applying them
 * in another order.
 */
#include "native.h"

#include <errno.h>
#include <linux/fuse.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

typedef struct {
    uint64_t ino;
    uint64_t count;
} Forget;

static struct {
    pthread_mutex_t lock;
    int ready_fd; /* the eventfd; -1 until Python asks for it: the filter passes FORGETs on */
    Forget *items;
    size_t length, capacity;
} gathered = {PTHREAD_MUTEX_INITIALIZER, -1, NULL, 0, 0};

/* Room for `more` items (under the lock); 0 on success */
static int reserve(size_t more)
{
    size_t capacity = gathered.capacity ? gathered.capacity : 1024;
    Forget *items;

    if (gathered.length + more <= gathered.capacity)
        return 0;
    while (capacity < gathered.length + more)
        capacity *= 2;
    items = realloc(gathered.items, capacity * sizeof *items);
    if (items == NULL)
        return -1;
    gathered.items = items;
    gathered.capacity = capacity;
    return 0;
}

/* fork(): the child starts with nothing gathered and FORGETs passed on until it asks, so that a
   daemon forked from a process that gathered does not share its eventfd or take its list. */
static void lock_before_fork(void)
{
    pthread_mutex_lock(&gathered.lock);
}

static void unlock_after_fork(void)
{
    pthread_mutex_unlock(&gathered.lock);
}

static void forget_in_child(void)
{
    if (gathered.ready_fd >= 0)
        close(gathered.ready_fd);
    free(gathered.items);
    gathered.ready_fd = -1;
    gathered.items = NULL;
    gathered.length = gathered.capacity = 0;
    pthread_mutex_unlock(&gathered.lock);
}

int forgets_init(void)
{
    static int registered;

    if (!registered && pthread_atfork(lock_before_fork, unlock_after_fork, forget_in_child) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return -1;
    }
    registered = 1;
    return 0;
}

int forgets_take_request(const struct fuse_in_header *in, size_t size)
{
    const char *arg = (const char *) (in + 1);
    size_t arg_size = size - sizeof *in;
    const struct fuse_forget_one *ones = NULL;
    size_t count = 1;
    int taken = 0;

    if (in->opcode == FUSE_FORGET) {
        if (arg_size < sizeof(struct fuse_forget_in))
            return 0;
    } else if (in->opcode == FUSE_BATCH_FORGET) {
        if (arg_size < sizeof(struct fuse_batch_forget_in))
            return 0;
        count = ((const struct fuse_batch_forget_in *) arg)->count;
        ones = (const struct fuse_forget_one *) (arg + sizeof(struct fuse_batch_forget_in));
        if (count > (arg_size - sizeof(struct fuse_batch_forget_in)) / sizeof *ones)
            return 0; /* shorter than it says: Python's libfuse handles it */
    } else {
        return 0;
    }
    pthread_mutex_lock(&gathered.lock);
    if (gathered.ready_fd >= 0 && reserve(count) == 0) {
        int was_empty = gathered.length == 0;

        for (size_t i = 0; i < count; i++) {
            Forget *item = &gathered.items[gathered.length++];

            if (ones == NULL) {
                item->ino = in->nodeid;
                item->count = ((const struct fuse_forget_in *) arg)->nlookup;
            } else {
                item->ino = ones[i].nodeid;
                item->count = ones[i].nlookup;
            }
        }
        if (was_empty && count > 0) {
            uint64_t one = 1;
            ssize_t written = write(gathered.ready_fd, &one, sizeof one);
            (void) written; /* can fail only at a count of 2^64 - 1: readable anyway */
        }
        taken = 1;
    }
    pthread_mutex_unlock(&gathered.lock);
    return taken;
}

PyObject *native_forgets_fd(PyObject *module, PyObject *unused)
{
    int fd;

    pthread_mutex_lock(&gathered.lock);
    if (gathered.ready_fd < 0)
        gathered.ready_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    fd = gathered.ready_fd;
    pthread_mutex_unlock(&gathered.lock);
    if (fd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(fd);
}

PyObject *native_take_forgets(PyObject *module, PyObject *unused)
{
    Forget *items;
    size_t length;
    PyObject *taken;

    pthread_mutex_lock(&gathered.lock);
    if (gathered.ready_fd >= 0) {
        uint64_t value;
        ssize_t got = read(gathered.ready_fd, &value, sizeof value); /* not readable until more come */
        (void) got;
    }
    items = gathered.items;
    length = gathered.length;
    gathered.items = NULL;
    gathered.length = gathered.capacity = 0;
    pthread_mutex_unlock(&gathered.lock);

    /* One bytes object, not a tuple per FORGET: 150,000 tuples made at once set off collections
       of the cyclic garbage collector over the young objects of a reset (8 % of its time). */
    taken = PyBytes_FromStringAndSize((const char *) items, (Py_ssize_t) (length * sizeof *items));
    free(items);
    return taken;
}
