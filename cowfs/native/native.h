/*
 * cowfs._native, internal header: the structs the files of this directory
 * share and the functions one of them offers the others.
 *
 * The module is the compiled part of cowfs's read path:
 *
 *   rangemap.c       the range map's C core (buckets, lookups, snapshots),
 *                    which the READ server walks without the GIL;
 *   rangemap_type.c  the Python type RangeMap over that core (the API of
 *                    cowfs/rangemap.py);
 *   storelogs.c      a table log index -> fd, for store offsets
 *                    ``log << 44 | offset_in_log`` (and the type StoreLogs);
 *   view.c           View: one file's state as the READ server sees it, and
 *                    the file's lock;
 *   handles.c        fh -> view, ino -> view and the busy marks of requests
 *                    queued for Python;
 *   readserver.c     the READ server: the pyfuse3 request filter (patch
 *                    0005), its counters and the cold-read workers;
 *   notify.c         kernel cache invalidations, a batch without the GIL,
 *                    on the session fd the request filter reads;
 *   forgets.c        FORGETs the request filter gathers for Python to take
 *                    in one go;
 *   module.c         the module's functions and its init.
 *
 * The rules (docs/design.md, "The compiled read path"):
 *   - Python changes a view's state only while it holds the view's lock
 *     (``with view:``); leaving the lock publishes the owner's size,
 *     base_limit, base fd, identity and store fds into the view.  The map is
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
 * No function takes the GIL outside the Python-facing methods.
 */

#ifndef COWFS_NATIVE_H
#define COWFS_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>

#define BUCKET_SHIFT 26
#define ZEROS (-1)
#define STORE_LOG_SHIFT 44

/* ---- rangemap.c: the map (memory from PyMem_Raw*: no GIL needed) ---- */

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

/* Called for each piece of map_segments(): mapped is 0 for bytes outside the
   map (store is then meaningless); a non-zero return stops the walk */
typedef int (*segment_fn)(void *ctx, int64_t start, int64_t end, int64_t store, int mapped);

MapCore *map_new(void);
void map_ref(MapCore *m);
void map_unref(MapCore *m);
void map_clear(MapCore *m);
int map_add(MapCore *m, int64_t start, int64_t end, int64_t store, int64_t *added);
int64_t map_remove(MapCore *m, int64_t start, int64_t end);
int64_t map_last_end(const MapCore *m);
MapCore *map_snapshot(const MapCore *m);
int map_segments(const MapCore *m, int64_t start, int64_t end, segment_fn fn, void *ctx);
int continues(int64_t start, int64_t end, int64_t store, int64_t next_store);
Py_ssize_t bisect_right(const int64_t *a, Py_ssize_t n, int64_t x); /* first i with a[i] > x */

/* ---- rangemap_type.c ---- */

typedef struct {
    PyObject_HEAD MapCore *core;
} RangeMapObject;

extern PyTypeObject RangeMapType;

/* ---- storelogs.c: log index -> fd ---- */

#define LOGS_INLINE 16 /* logs a table holds in place: a store has a handful */
#define LOG_CHUNK 1024
#define LOG_CHUNKS (1 << (63 - STORE_LOG_SHIFT - 10)) /* 512 chunks: every log index of an int64 */

typedef struct {
    _Atomic(atomic_int *) chunks[LOG_CHUNKS]; /* chunk i: logs i * LOG_CHUNK ... (below LOGS_INLINE unused) */
} LogsMore;

typedef struct {
    atomic_long refs;
    atomic_int first[LOGS_INLINE];
    _Atomic(LogsMore *) more; /* allocated when a log past the first ones gets an fd */
} LogsCore;

typedef struct {
    PyObject_HEAD LogsCore *core;
} StoreLogsObject;

extern PyTypeObject StoreLogsType;

LogsCore *logs_new(void);
void logs_ref(LogsCore *l);
void logs_unref(LogsCore *l);
int logs_get(LogsCore *l, int64_t index);
int logs_set(LogsCore *l, int64_t index, int fd);

/* ---- view.c: one file's state for the READ server ---- */

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

typedef struct {
    PyObject_HEAD ViewCore *core;
    PyObject *owner;      /* weak reference to the OverlayFile whose state this publishes */
    PyObject *map;        /* the RangeMap object whose core the view uses */
    PyObject *identity;   /* the last base identity published (strong) */
    int private_logs;     /* the logs table is the view's own: a copy of owner.log_fds */
    int depth;            /* nested `with view:` of the Python thread */
} ViewObject;

extern PyTypeObject ViewType;

void view_ref(ViewCore *v);
void view_unref(ViewCore *v);
int view_init_names(void); /* the owner's attribute names, interned; -1 on error */

/* ---- handles.c: fh -> view, ino -> view, busy marks ---- */

ViewCore *handle_view(uint64_t fh, int *direct);
void mark_busy(uint64_t ino, uint64_t unique);
void unmark_busy(uint64_t unique);
void handles_sizes(size_t *handles, size_t *inodes, size_t *pending);
PyObject *native_register_handle(PyObject *module, PyObject *args);
PyObject *native_unregister_handle(PyObject *module, PyObject *args);

/* ---- notify.c ---- */

void notify_remember_fd(int fd);
void notify_forget_fd(void);
PyObject *native_invalidate(PyObject *module, PyObject *args);

/* ---- forgets.c ---- */

struct fuse_in_header;
/* 0, or -1 with an exception set; once per process, at import */
int forgets_init(void);
int forgets_take_request(const struct fuse_in_header *in, size_t size);
PyObject *native_forgets_fd(PyObject *module, PyObject *unused);
PyObject *native_take_forgets(PyObject *module, PyObject *unused);

/* ---- readserver.c ---- */

int workers_running(void);
PyObject *native_request_filter(PyObject *module, PyObject *unused);
PyObject *native_counters(PyObject *module, PyObject *unused);
PyObject *native_reset_counters(PyObject *module, PyObject *unused);

#endif
