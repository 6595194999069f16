/*
 * Handles and busy marks: fh -> (view, O_DIRECT), ino -> (view, handle
 * count), and unique -> view for the requests that change a file and wait
 * for Python (the file is busy until pyfuse3 has written their reply).
 *
 * Who changes them: the Python thread registers and unregisters handles
 * (OPEN/CREATE and RELEASE); the reader thread marks files busy and
 * pyfuse3's reply path clears the marks.  All under tables_lock, held only
 * for a lookup; a view found here is returned with a reference of its own.
 */
#include "native.h"

#include <stdlib.h>

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
ViewCore *handle_view(uint64_t fh, int *direct)
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
void mark_busy(uint64_t ino, uint64_t unique)
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

/* The reply to unique was written: its file is no longer busy for it */
void unmark_busy(uint64_t unique)
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

void handles_sizes(size_t *handle_count, size_t *inode_count, size_t *pending_count)
{
    pthread_mutex_lock(&tables_lock);
    *handle_count = handles.len;
    *inode_count = inodes.len;
    *pending_count = pending.len;
    pthread_mutex_unlock(&tables_lock);
}

PyObject *native_register_handle(PyObject *module, PyObject *args)
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

PyObject *native_unregister_handle(PyObject *module, PyObject *args)
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

