/* The broker's bus proxy with per-topic-family counting, in C: no Python, and no second copy of any
 * message, on the hot path.
 *
 * libzmq's own proxy can only count through a capture socket, which hands a reference to every part of
 * every message to a second socket; the Python side then has to read them all, and 400 KB buffers stay
 * alive until it has (bench/broker.py: 10-15 % of the bus's 400 KB throughput on two cores). This loop
 * forwards as zmq_proxy does (publishers' messages front -> back, subscriptions back -> front, in bursts),
 * with these differences, counted in buffers the broker's Python side reads now and then:
 *
 *  - lanes: there is one back (an XPUB) per lane, and a message goes to its family's lane (the broker sizes
 *    each lane's queues for the largest message it carries);
 *  - a queue that looks full gets patience_ms to make room before its subscriber loses the message: a
 *    healthy subscriber behind a burst catches up (libzmq learns what it has taken by commands, which a
 *    send reads at most once a millisecond, and its I/O thread may not have run yet), a stalled one is
 *    passed by. A lane waits at most wait_per_s_ms a second in all, so a slow subscriber cannot slow the
 *    bus down. (The marks themselves never change: libzmq's low-water protocol can leave a queue stuck when
 *    one does, since its reader reports what it took every lwm messages, lwm from the mark);
 *  - what the subscribers' queues hold is known ("held", per lane, a message queued for several counted
 *    once): the last part of each message it sends is a zmq_msg_init_data() view of the received one,
 *    whose free function (called by libzmq when the last queue lets go of it) takes it off the tally;
 *  - a message larger than its family's max_bytes (all its frames together: libzmq's ZMQ_MAXMSGSIZE
 *    bounds one frame) is refused, never queued for anyone ("refused");
 *  - a subscriber's queue that overflows is counted ("overflows"): the backs are XPUB_NODROP, so a send
 *    that a full queue cannot take says so (EAGAIN) instead of dropping in silence; it is then sent
 *    again, lossy, to every subscriber that has room. libzmq then passes the full one by, unseen (it is
 *    no longer a candidate), until it has read its way back below its high-water mark: one count per
 *    overflow, not per message lost; receivers count those from sequence numbers.
 *
 * It uses the libzmq that pyzmq has already loaded (found with dlopen(RTLD_NOLOAD) by its path), so the
 * sockets pyzmq made are this library's sockets. Optional: where it does not build or load, the broker
 * counts through the capture socket.
 *
 * Python API (charles.broker._countproxy), API = 4:
 *   load(path)                          bind to the loaded libzmq at path; raises OSError if it is not loaded
 *   run(front, backs, control, families, lanes, limits, counts, held, patience_ms, wait_per_s_ms, eterm)
 *       front/control: pyzmq Socket.underlying addresses (XSUB, a PAIR for "TERMINATE"); backs: a tuple of
 *       them (XPUBs, one per lane); families: tuple of bytes (family names); lanes, limits: tuples of
 *       len(families) + 1 ints, each family's back and max_bytes, the last for "unknown"; counts: writable
 *       int64 buffer of 4 * (len(families) + 1): per family (messages, bytes) forwarded, overflows of a
 *       subscriber's queue, messages refused over max_bytes; held: writable int64 buffer of 2 * len(backs):
 *       per lane the bytes and the messages its queues hold (refreshed at least every 0.1 s); patience_ms,
 *       wait_per_s_ms: see publish(); eterm: zmq.ETERM.
 *       Returns when "TERMINATE" arrives on control or the context is terminated; raises OSError on
 *       any other libzmq error. Releases the GIL for its whole life.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ZMQ_DONTWAIT 1
#define ZMQ_SNDMORE 2
#define ZMQ_POLLIN 1
#define ZMQ_EVENTS 15
#define ZMQ_XPUB_NODROP 69
#define BURST 1000 /* messages forwarded per socket per poll, as zmq_proxy does */
#define MAX_FAMILIES 64
#define MAX_LANES 4
#define COUNTERS 4 /* per family: messages, bytes, overflows, refused */
#define HELD 2     /* per lane: bytes held, messages held */
#define PART_OVERHEAD 128 /* bytes libzmq spends on a queued part beside its data (zmq_msg_t, content) */
#define TICK_MS 100       /* Python's view of what is held is refreshed at least this often */

typedef struct {
    unsigned char _[64];
} __attribute__((aligned(sizeof(void *)))) zmsg_t; /* zmq_msg_t's size and alignment (zmq.h) */

typedef struct {
    void *socket;
    int fd;
    short events;
    short revents;
} zpollitem_t; /* zmq_pollitem_t on POSIX */

typedef void(zfree_fn)(void *data, void *hint);

static int (*z_msg_init)(zmsg_t *);
static int (*z_msg_init_data)(zmsg_t *, void *, size_t, zfree_fn *, void *);
static int (*z_msg_recv)(zmsg_t *, void *, int);
static int (*z_msg_send)(zmsg_t *, void *, int);
static int (*z_msg_close)(zmsg_t *);
static void *(*z_msg_data)(zmsg_t *);
static size_t (*z_msg_size)(const zmsg_t *);
static int (*z_msg_more)(const zmsg_t *);
static int (*z_poll)(zpollitem_t *, int, long);
static int (*z_setsockopt)(void *, int, const void *, size_t);
static int (*z_getsockopt)(void *, int, void *, size_t *);
static int (*z_errno)(void);
static int loaded = 0;

static PyObject *load(PyObject *self, PyObject *args) {
    const char *path;
    if (!PyArg_ParseTuple(args, "s", &path))
        return NULL;
    void *lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (lib == NULL) {
        PyErr_Format(PyExc_OSError, "libzmq at %s is not loaded in this process: %s", path, dlerror());
        return NULL;
    }
    struct {
        const char *name;
        void **slot;
    } syms[] = {
        {"zmq_msg_init", (void **)&z_msg_init}, {"zmq_msg_init_data", (void **)&z_msg_init_data},
        {"zmq_msg_recv", (void **)&z_msg_recv},
        {"zmq_msg_send", (void **)&z_msg_send}, {"zmq_msg_close", (void **)&z_msg_close},
        {"zmq_msg_data", (void **)&z_msg_data}, {"zmq_msg_size", (void **)&z_msg_size},
        {"zmq_msg_more", (void **)&z_msg_more}, {"zmq_poll", (void **)&z_poll},
        {"zmq_setsockopt", (void **)&z_setsockopt}, {"zmq_getsockopt", (void **)&z_getsockopt},
        {"zmq_errno", (void **)&z_errno},
    };
    enum { N = sizeof(syms) / sizeof(syms[0]) };
    void *found[N];
    for (size_t i = 0; i < N; i++) {
        found[i] = dlsym(lib, syms[i].name);
        if (found[i] == NULL) { /* nothing changes: a library bound before stays bound */
            PyErr_Format(PyExc_OSError, "%s has no %s", path, syms[i].name);
            return NULL;
        }
    }
    for (size_t i = 0; i < N; i++)
        *syms[i].slot = found[i];
    loaded = 1; /* the handle stays open: pyzmq keeps the library loaded anyway */
    Py_RETURN_NONE;
}

typedef struct {
    int n;
    const char *name[MAX_FAMILIES];
    size_t len[MAX_FAMILIES];
    int lane[MAX_FAMILIES + 1];        /* the last: "unknown" */
    int64_t limit[MAX_FAMILIES + 1];   /* max_bytes of a whole message */
} families_t;

/* The family of a topic: the bytes before the first '.', matched exactly; n ("unknown") otherwise. */
static int family_of(const families_t *f, const char *topic, size_t size) {
    const char *dot = memchr(topic, '.', size);
    size_t len = dot ? (size_t)(dot - topic) : size;
    for (int i = 0; i < f->n; i++)
        if (f->len[i] == len && memcmp(f->name[i], topic, len) == 0)
            return i;
    return f->n;
}

/* The parts of the message being forwarded. libzmq has taken the whole message before the first part can
 * be read, so holding the parts costs their zmq_msg_t only (64 bytes each), never a copy. */
typedef struct {
    zmsg_t *part;
    size_t n, cap;
} parts_t;

#define KEEP_PARTS 1024 /* a message of more frames grows the array for itself alone */

static void close_parts(parts_t *p) {
    for (size_t i = 0; i < p->n; i++)
        z_msg_close(&p->part[i]);
    p->n = 0;
    if (p->cap > KEEP_PARTS) {
        free(p->part);
        p->part = NULL;
        p->cap = 0;
    }
}

/* Receive one whole message into p (the first part DONTWAIT): 1, 0 when none is waiting, -1 on an error. */
static int recv_message(void *from, parts_t *p) {
    for (;;) {
        if (p->n == p->cap) {
            size_t cap = p->cap ? 2 * p->cap : 16;
            zmsg_t *grown = realloc(p->part, cap * sizeof(zmsg_t));
            if (grown == NULL) {
                errno = ENOMEM;
                return -1;
            }
            p->part = grown;
            p->cap = cap;
        }
        zmsg_t *msg = &p->part[p->n];
        z_msg_init(msg);
        if (z_msg_recv(msg, from, p->n == 0 ? ZMQ_DONTWAIT : 0) < 0) {
            int e = z_errno();
            z_msg_close(msg);
            if (e == EAGAIN && p->n == 0)
                return 0;
            errno = e;
            return -1;
        }
        p->n++;
        if (!z_msg_more(msg))
            return 1;
    }
}

/* Send p's parts from *sent on (DONTWAIT), advancing *sent: 0 when all went, -1 with errno set. */
static int send_parts(void *to, parts_t *p, size_t *sent) {
    for (; *sent < p->n; (*sent)++)
        if (z_msg_send(&p->part[*sent], to, (*sent + 1 < p->n ? ZMQ_SNDMORE : 0) | ZMQ_DONTWAIT) < 0) {
            errno = z_errno();
            return -1;
        }
    return 0;
}

static int64_t now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* What each lane's subscriber queues hold, all subscribers together (a message queued for several is held
 * once: they share it). The proxy thread adds a message before it sends it; release() takes it off, in
 * whichever thread libzmq lets go of it, so the tally outlives run() until the last message is gone. */
typedef struct {
    int64_t refs; /* run() and each message held */
    int64_t bytes[MAX_LANES], msgs[MAX_LANES];
} flight_t;

typedef struct {
    zmsg_t orig; /* the received last part, kept alive while the view of it is queued */
    flight_t *flight;
    int lane;
    int64_t bytes;
} hold_t;

static void release(void *data, void *hint) {
    (void)data;
    hold_t *h = hint;
    flight_t *f = h->flight;
    __atomic_sub_fetch(&f->bytes[h->lane], h->bytes, __ATOMIC_RELAXED);
    __atomic_sub_fetch(&f->msgs[h->lane], 1, __ATOMIC_RELAXED);
    z_msg_close(&h->orig);
    free(h);
    if (__atomic_sub_fetch(&f->refs, 1, __ATOMIC_ACQ_REL) == 0)
        free(f);
}

/* Put p's last part on lane's tally: it becomes a view of itself that tells release() when libzmq is done
 * with it (all parts of a message leave a queue together, the last one last). 0, or -1 with errno set. */
static int hold(flight_t *f, int lane, parts_t *p, int64_t bytes) {
    hold_t *h = malloc(sizeof *h);
    if (h == NULL) {
        errno = ENOMEM;
        return -1;
    }
    zmsg_t *last = &p->part[p->n - 1];
    memcpy(&h->orig, last, sizeof(zmsg_t)); /* moved: libzmq's own queues copy zmq_msg_t by value */
    h->flight = f;
    h->lane = lane;
    h->bytes = bytes;
    __atomic_add_fetch(&f->refs, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&f->bytes[lane], bytes, __ATOMIC_RELAXED);
    __atomic_add_fetch(&f->msgs[lane], 1, __ATOMIC_RELAXED);
    if (z_msg_init_data(last, z_msg_data(&h->orig), z_msg_size(&h->orig), release, h) < 0) {
        int e = z_errno();
        memcpy(last, &h->orig, sizeof(zmsg_t));
        __atomic_sub_fetch(&f->bytes[lane], bytes, __ATOMIC_RELAXED);
        __atomic_sub_fetch(&f->msgs[lane], 1, __ATOMIC_RELAXED);
        __atomic_sub_fetch(&f->refs, 1, __ATOMIC_RELAXED);
        free(h);
        errno = e;
        return -1;
    }
    return 0;
}

typedef struct {
    int n;
    void *back[MAX_LANES];
    int64_t credit_us[MAX_LANES], refilled_ms[MAX_LANES]; /* what each lane may still wait, and since when */
    int64_t patience_ms, wait_per_s_ms;
    flight_t *flight;
    int64_t *out; /* HELD per lane, for Python */
} lanes_t;

/* Send a message to a lane's XPUB_NODROP back: 1 when every matching subscriber took it, 0 when a queue
 * stayed full (it went to the others: the back is lossy for the rest of this message), -1 on an error. */
static int publish(lanes_t *l, int lane, parts_t *p) {
    void *to = l->back[lane];
    size_t sent = 0;
    if (send_parts(to, p, &sent) == 0)
        return 1;
    /* EAGAIN: a matching subscriber's queue is full (libzmq checks before the first part; the rest of a
     * message follows its first part). Patience first, as long as the lane has waiting left */
    if (errno != EAGAIN)
        return -1;
    int64_t now = now_ms(), credit = l->credit_us[lane] + (now - l->refilled_ms[lane]) * l->wait_per_s_ms;
    credit = credit > 1000 * l->wait_per_s_ms ? 1000 * l->wait_per_s_ms : credit; /* a second's worth */
    l->refilled_ms[lane] = now;
    int64_t start = now, wait_ms = credit / 1000 < l->patience_ms ? credit / 1000 : l->patience_ms;
    int64_t deadline = now + wait_ms;
    while (now < deadline) {
        struct timespec nap = {0, 200000};
        nanosleep(&nap, NULL);
        int events;
        size_t size = sizeof events;
        if (z_getsockopt(to, ZMQ_EVENTS, &events, &size) < 0) { /* reads the socket's commands */
            errno = z_errno();
            return -1;
        }
        if (send_parts(to, p, &sent) == 0) {
            l->credit_us[lane] = credit - 1000 * (now_ms() - start);
            return 1;
        }
        if (errno != EAGAIN)
            return -1;
        now = now_ms();
    }
    l->credit_us[lane] = credit - 1000 * (now - start);
    int lossy = 0, nodrop = 1;
    int rc = z_setsockopt(to, ZMQ_XPUB_NODROP, &lossy, sizeof lossy);
    if (rc < 0)
        errno = z_errno();
    else
        rc = send_parts(to, p, &sent);
    int e = errno;
    if (z_setsockopt(to, ZMQ_XPUB_NODROP, &nodrop, sizeof nodrop) < 0 && rc == 0) {
        rc = -1;
        e = z_errno();
    }
    errno = e;
    return rc < 0 ? -1 : 0;
}

/* Publishers' messages: up to BURST, each to its family's lane, counted. 0, or -1 with errno set. */
static int forward(void *from, lanes_t *l, const families_t *f, int64_t *counts, parts_t *p) {
    for (int n = 0; n < BURST; n++) {
        int got = recv_message(from, p);
        if (got <= 0) {
            int e = errno;
            close_parts(p);
            errno = e;
            return got;
        }
        int family = family_of(f, (const char *)z_msg_data(&p->part[0]), z_msg_size(&p->part[0]));
        int64_t bytes = 0;
        for (size_t i = 0; i < p->n; i++)
            bytes += (int64_t)z_msg_size(&p->part[i]);
        int64_t *c = counts + COUNTERS * family;
        if (bytes > f->limit[family]) {
            c[3] += 1; /* refused: no receiver may accept it, and no queue may hold it */
            close_parts(p);
            continue;
        }
        int lane = f->lane[family];
        if (hold(l->flight, lane, p, bytes + PART_OVERHEAD * (int64_t)p->n) < 0) {
            int e = errno;
            close_parts(p);
            errno = e;
            return -1;
        }
        int sent = publish(l, lane, p);
        int e = errno;
        close_parts(p);
        if (sent < 0) {
            errno = e;
            return -1;
        }
        c[0] += 1;
        c[1] += bytes;
        c[2] += sent == 0;
    }
    return 0;
}

/* Subscriptions (a back's messages) to the publishers, up to BURST, as zmq_proxy does. */
static int relay(void *from, void *to, parts_t *p) {
    for (int n = 0; n < BURST; n++) {
        size_t sent = 0;
        int got = recv_message(from, p);
        if (got > 0 && send_parts(to, p, &sent) < 0)
            got = -1;
        int e = errno;
        close_parts(p);
        errno = e;
        if (got <= 0)
            return got;
    }
    return 0;
}

/* 1 when the control socket said TERMINATE, 0 for anything else, -1 on an error (errno set). */
static int control_says_stop(void *control) {
    int stop = 0, more = 1, first = 1;
    while (more) {
        zmsg_t msg;
        z_msg_init(&msg);
        if (z_msg_recv(&msg, control, first ? ZMQ_DONTWAIT : 0) < 0) {
            int e = z_errno();
            z_msg_close(&msg);
            if (e == EAGAIN && first)
                return 0;
            errno = e;
            return -1;
        }
        if (first && z_msg_size(&msg) == 9 && memcmp(z_msg_data(&msg), "TERMINATE", 9) == 0)
            stop = 1;
        more = z_msg_more(&msg);
        first = 0;
        z_msg_close(&msg);
    }
    return stop;
}

static int int_items(PyObject *tuple, int n, const char *what, int64_t *out) {
    if (PyTuple_GET_SIZE(tuple) != n) {
        PyErr_Format(PyExc_ValueError, "%s must have %d items", what, n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        out[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(tuple, i));
        if (out[i] == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

static void refresh(lanes_t *l) {
    for (int i = 0; i < l->n; i++) {
        l->out[HELD * i] = __atomic_load_n(&l->flight->bytes[i], __ATOMIC_RELAXED);
        l->out[HELD * i + 1] = __atomic_load_n(&l->flight->msgs[i], __ATOMIC_RELAXED);
    }
}

static PyObject *run(PyObject *self, PyObject *args) {
    unsigned long long front_addr, control_addr;
    PyObject *back_addrs, *names, *lanes, *limits;
    Py_buffer counts, held;
    long long patience_ms, wait_per_s_ms;
    int eterm;
    if (!loaded) {
        PyErr_SetString(PyExc_RuntimeError, "call load(path) first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "KO!KO!O!O!w*w*LLi", &front_addr, &PyTuple_Type, &back_addrs, &control_addr,
                          &PyTuple_Type, &names, &PyTuple_Type, &lanes, &PyTuple_Type, &limits, &counts, &held,
                          &patience_ms, &wait_per_s_ms, &eterm))
        return NULL;
    families_t f;
    lanes_t l;
    l.n = (int)PyTuple_GET_SIZE(back_addrs);
    f.n = (int)PyTuple_GET_SIZE(names);
    int64_t lane[MAX_FAMILIES + 1], back[MAX_LANES];
    int bad = 1; /* an exception is set */
    if (f.n > MAX_FAMILIES)
        PyErr_Format(PyExc_ValueError, "at most %d families", MAX_FAMILIES);
    else if (l.n < 1 || l.n > MAX_LANES)
        PyErr_Format(PyExc_ValueError, "1 to %d backs", MAX_LANES);
    else if (counts.len < (Py_ssize_t)(COUNTERS * (f.n + 1) * sizeof(int64_t)) ||
             counts.itemsize != sizeof(int64_t))
        PyErr_Format(PyExc_ValueError, "counts must be %d int64", COUNTERS * (f.n + 1));
    else if (held.len < (Py_ssize_t)(HELD * l.n * sizeof(int64_t)) || held.itemsize != sizeof(int64_t))
        PyErr_Format(PyExc_ValueError, "held must be %d int64", HELD * l.n);
    else if (int_items(back_addrs, l.n, "backs", back) == 0 && int_items(lanes, f.n + 1, "lanes", lane) == 0 &&
             int_items(limits, f.n + 1, "limits", f.limit) == 0)
        bad = 0;
    for (int i = 0; !bad && i <= f.n; i++) {
        if (lane[i] < 0 || lane[i] >= l.n) {
            PyErr_Format(PyExc_ValueError, "lane %lld of family %d is not a back", (long long)lane[i], i);
            bad = 1;
        }
        f.lane[i] = (int)lane[i];
    }
    for (int i = 0; !bad && i < f.n; i++) {
        PyObject *b = PyTuple_GET_ITEM(names, i);
        if (!PyBytes_Check(b)) {
            PyErr_Format(PyExc_TypeError, "family names must be bytes");
            bad = 1;
        }
        f.name[i] = bad ? NULL : PyBytes_AS_STRING(b); /* the tuple is held by the caller for the run */
        f.len[i] = bad ? 0 : (size_t)PyBytes_GET_SIZE(b);
    }
    if (!bad && (l.flight = calloc(1, sizeof(flight_t))) == NULL) {
        PyErr_NoMemory();
        bad = 1;
    }
    if (bad) {
        PyBuffer_Release(&counts);
        PyBuffer_Release(&held);
        return NULL;
    }
    l.flight->refs = 1;
    l.out = (int64_t *)held.buf;
    l.patience_ms = patience_ms;
    l.wait_per_s_ms = wait_per_s_ms;
    int64_t *c = (int64_t *)counts.buf;
    zpollitem_t items[MAX_LANES + 2];
    items[0] = (zpollitem_t){(void *)(uintptr_t)front_addr, 0, ZMQ_POLLIN, 0};
    items[1] = (zpollitem_t){(void *)(uintptr_t)control_addr, 0, ZMQ_POLLIN, 0};
    for (int i = 0; i < l.n; i++) {
        l.back[i] = (void *)(uintptr_t)back[i];
        l.credit_us[i] = 1000 * wait_per_s_ms;
        l.refilled_ms[i] = now_ms();
        items[2 + i] = (zpollitem_t){l.back[i], 0, ZMQ_POLLIN, 0};
    }
    parts_t p = {NULL, 0, 0};
    int one = 1, err_no = 0;
    Py_BEGIN_ALLOW_THREADS;
    for (int i = 0; i < l.n && err_no == 0; i++) {
        if (z_setsockopt(l.back[i], ZMQ_XPUB_NODROP, &one, sizeof one) < 0) /* see publish() */
            err_no = z_errno();
    }
    while (err_no == 0) {
        refresh(&l);
        if (z_poll(items, 2 + l.n, TICK_MS) < 0) {
            err_no = z_errno();
            if (err_no == EINTR) {
                err_no = 0;
                continue;
            }
            break;
        }
        if (items[1].revents & ZMQ_POLLIN) {
            int stop = control_says_stop(items[1].socket);
            if (stop != 0) {
                err_no = stop < 0 ? errno : 0;
                break;
            }
        }
        if ((items[0].revents & ZMQ_POLLIN) && forward(items[0].socket, &l, &f, c, &p) < 0) {
            err_no = errno;
            break;
        }
        for (int i = 0; i < l.n && err_no == 0; i++)
            if ((items[2 + i].revents & ZMQ_POLLIN) && relay(l.back[i], items[0].socket, &p) < 0)
                err_no = errno;
    }
    Py_END_ALLOW_THREADS;
    close_parts(&p);
    free(p.part);
    refresh(&l);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&held);
    if (__atomic_sub_fetch(&l.flight->refs, 1, __ATOMIC_ACQ_REL) == 0)
        free(l.flight);
    if (err_no != 0 && err_no != eterm)
        return PyErr_Format(PyExc_OSError, "counting proxy stopped: libzmq error %d", err_no);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"load", load, METH_VARARGS, "Bind to the libzmq already loaded at path."},
    {"run", run, METH_VARARGS, "Forward and count until TERMINATE or the context ends (GIL released)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_countproxy",
                                    "The broker's counting proxy (see the file's header).", -1, methods};

PyMODINIT_FUNC PyInit__countproxy(void) {
    PyObject *m = PyModule_Create(&module);
    /* the run() this file defines: a build of an older file is not used (broker.py's COUNTPROXY_API) */
    if (m != NULL && PyModule_AddIntConstant(m, "API", 4) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
