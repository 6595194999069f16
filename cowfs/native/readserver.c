/*
 * The READ server: a pyfuse3 request filter (patch 0005) whose reader thread
 * answers READs of registered handles from their views without the GIL,
 * marks files busy while a request that changes them waits for Python, and
 * hands READs that must wait for the disk to a small pool of workers; and
 * its counters.
 *
 * It changes no view state: it reads a view only under the view's lock (the
 * Python thread changes it only under that lock), sets the view's atomics
 * (nowait_fails, base_modified) and reads the fds it was given -- the reader
 * under the lock, a worker through its own dup()s.  Anything unusual goes to
 * Python, which answers as without this module.
 */
#include "native.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

#define DIRECT_IO_ALIGNMENT 512
/* A READ is at most 1 MiB (libfuse's max_pages); a page extra for safety */
#define MAX_READ ((size_t) 1 << 20)
/* Pieces one READ may need (base, store, zeros); beyond that it goes to Python */
#define MAX_PIECES 256
#define MAX_WORKERS 16
/* A cold read warms the page cache this often before it reads under the lock */
#define COLD_ATTEMPTS 3

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

    notify_remember_fd(fd);
    switch (in->opcode) {
    case FUSE_READ:
        return serve_read(fd, in, size);
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
        return forgets_take_request(in, size);
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
    unmark_busy(unique);
}

/* pyfuse3 calls this after its reader ended, before the fd closes: the workers
   answer what they hold and end. */
static void filter_stop(void *data)
{
    notify_forget_fd(); /* (waits for a batch of invalidations being written) */
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

int workers_running(void)
{
    int count;

    pthread_mutex_lock(&workers.lock);
    count = workers.count;
    pthread_mutex_unlock(&workers.lock);
    return count;
}

PyObject *native_request_filter(PyObject *module, PyObject *unused)
{
    return PyCapsule_New((void *) &the_filter, PYFUSE3_REQUEST_FILTER_CAPSULE, NULL);
}

PyObject *native_counters(PyObject *module, PyObject *unused)
{
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "served", atomic_load(&counts.served), "served_ns",
                         atomic_load(&counts.served_ns), "served_bytes", atomic_load(&counts.served_bytes), "cold",
                         atomic_load(&counts.cold), "errors", atomic_load(&counts.errors), "passed_busy",
                         atomic_load(&counts.passed_busy), "passed_other", atomic_load(&counts.passed_other));
}

PyObject *native_reset_counters(PyObject *module, PyObject *unused)
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

