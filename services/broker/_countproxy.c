/* The broker's bus proxy with per-topic-family counting, in C: no Python, and no second copy of any
 * message, on the hot path.
 *
 * libzmq's own proxy can only count through a capture socket, which hands a reference to every part of
 * every message to a second socket; the Python side then has to read them all, and 400 KB buffers stay
 * alive until it has (bench/broker.py: 10-15 % of the bus's 400 KB throughput on two cores). This loop
 * forwards exactly as zmq_proxy does (publishers' messages front -> back, subscriptions back -> front, in
 * bursts) and, for each message going to the subscribers, adds 1 and its size in bytes to its family's
 * two counters in a buffer the broker's Python side reads now and then.
 *
 * It uses the libzmq that pyzmq has already loaded (found with dlopen(RTLD_NOLOAD) by its path), so the
 * sockets pyzmq made are this library's sockets. Optional: where it does not build or load, the broker
 * counts through the capture socket.
 *
 * Python API (charles.broker._countproxy):
 *   load(path)                          bind to the loaded libzmq at path; raises OSError if it is not loaded
 *   run(front, back, control, families, counts, eterm)
 *       front/back/control: pyzmq Socket.underlying addresses (XSUB, XPUB, a PAIR for "TERMINATE");
 *       families: tuple of bytes (family names); counts: writable int64 buffer of 2 * (len(families) + 1)
 *       (messages, bytes per family; the last pair is "unknown"); eterm: zmq.ETERM.
 *       Returns when "TERMINATE" arrives on control or the context is terminated; raises OSError on
 *       any other libzmq error. Releases the GIL for its whole life.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>

#define ZMQ_DONTWAIT 1
#define ZMQ_SNDMORE 2
#define ZMQ_POLLIN 1
#define BURST 1000 /* messages forwarded per socket per poll, as zmq_proxy does */
#define MAX_FAMILIES 64

typedef struct {
    unsigned char _[64];
} __attribute__((aligned(sizeof(void *)))) zmsg_t; /* zmq_msg_t's size and alignment (zmq.h) */

typedef struct {
    void *socket;
    int fd;
    short events;
    short revents;
} zpollitem_t; /* zmq_pollitem_t on POSIX */

static int (*z_msg_init)(zmsg_t *);
static int (*z_msg_recv)(zmsg_t *, void *, int);
static int (*z_msg_send)(zmsg_t *, void *, int);
static int (*z_msg_close)(zmsg_t *);
static void *(*z_msg_data)(zmsg_t *);
static size_t (*z_msg_size)(const zmsg_t *);
static int (*z_msg_more)(const zmsg_t *);
static int (*z_poll)(zpollitem_t *, int, long);
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
        {"zmq_msg_init", (void **)&z_msg_init}, {"zmq_msg_recv", (void **)&z_msg_recv},
        {"zmq_msg_send", (void **)&z_msg_send}, {"zmq_msg_close", (void **)&z_msg_close},
        {"zmq_msg_data", (void **)&z_msg_data}, {"zmq_msg_size", (void **)&z_msg_size},
        {"zmq_msg_more", (void **)&z_msg_more}, {"zmq_poll", (void **)&z_poll},
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

/* Forward up to BURST whole messages; count them when counts is not NULL. 0, or -1 with errno set. */
static int forward(void *from, void *to, const families_t *f, int64_t *counts) {
    for (int n = 0; n < BURST; n++) {
        zmsg_t msg;
        z_msg_init(&msg);
        if (z_msg_recv(&msg, from, ZMQ_DONTWAIT) < 0) {
            int e = z_errno();
            z_msg_close(&msg);
            if (e == EAGAIN)
                return 0;
            errno = e;
            return -1;
        }
        int family = counts ? family_of(f, (const char *)z_msg_data(&msg), z_msg_size(&msg)) : 0;
        int64_t bytes = 0;
        for (;;) { /* the other parts of a message are there already: libzmq delivers it whole */
            int more = z_msg_more(&msg);
            bytes += (int64_t)z_msg_size(&msg);
            if (z_msg_send(&msg, to, more ? ZMQ_SNDMORE : 0) < 0) {
                int e = z_errno();
                z_msg_close(&msg);
                errno = e;
                return -1;
            }
            if (!more)
                break;
            z_msg_init(&msg);
            if (z_msg_recv(&msg, from, 0) < 0) {
                int e = z_errno();
                z_msg_close(&msg);
                errno = e;
                return -1;
            }
        }
        if (counts) {
            counts[2 * family] += 1;
            counts[2 * family + 1] += bytes;
        }
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

static PyObject *run(PyObject *self, PyObject *args) {
    unsigned long long front_addr, back_addr, control_addr;
    PyObject *names;
    Py_buffer counts;
    int eterm;
    if (!loaded) {
        PyErr_SetString(PyExc_RuntimeError, "call load(path) first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "KKKO!w*i", &front_addr, &back_addr, &control_addr, &PyTuple_Type, &names,
                          &counts, &eterm))
        return NULL;
    families_t f;
    f.n = (int)PyTuple_GET_SIZE(names);
    if (f.n > MAX_FAMILIES) {
        PyBuffer_Release(&counts);
        return PyErr_Format(PyExc_ValueError, "at most %d families", MAX_FAMILIES);
    }
    if (counts.len < (Py_ssize_t)(2 * (f.n + 1) * sizeof(int64_t)) || counts.itemsize != sizeof(int64_t)) {
        PyBuffer_Release(&counts);
        return PyErr_Format(PyExc_ValueError, "counts must be %d int64", 2 * (f.n + 1));
    }
    for (int i = 0; i < f.n; i++) {
        PyObject *b = PyTuple_GET_ITEM(names, i);
        if (!PyBytes_Check(b)) {
            PyBuffer_Release(&counts);
            return PyErr_Format(PyExc_TypeError, "family names must be bytes");
        }
        f.name[i] = PyBytes_AS_STRING(b); /* the tuple is held by the caller for the whole run */
        f.len[i] = (size_t)PyBytes_GET_SIZE(b);
    }
    int64_t *c = (int64_t *)counts.buf;
    zpollitem_t items[3] = {
        {(void *)(uintptr_t)front_addr, 0, ZMQ_POLLIN, 0},
        {(void *)(uintptr_t)back_addr, 0, ZMQ_POLLIN, 0},
        {(void *)(uintptr_t)control_addr, 0, ZMQ_POLLIN, 0},
    };
    int err = 0;
    Py_BEGIN_ALLOW_THREADS;
    for (;;) {
        if (z_poll(items, 3, -1) < 0) {
            err = z_errno();
            if (err == EINTR) {
                err = 0;
                continue;
            }
            break;
        }
        if (items[2].revents & ZMQ_POLLIN) {
            int stop = control_says_stop(items[2].socket);
            if (stop != 0) {
                err = stop < 0 ? errno : 0;
                break;
            }
        }
        if ((items[0].revents & ZMQ_POLLIN) && forward(items[0].socket, items[1].socket, &f, c) < 0) {
            err = errno;
            break;
        }
        if ((items[1].revents & ZMQ_POLLIN) && forward(items[1].socket, items[0].socket, &f, NULL) < 0) {
            err = errno;
            break;
        }
    }
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&counts);
    if (err != 0 && err != eterm)
        return PyErr_Format(PyExc_OSError, "counting proxy stopped: libzmq error %d", err);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"load", load, METH_VARARGS, "Bind to the libzmq already loaded at path."},
    {"run", run, METH_VARARGS, "Forward and count until TERMINATE or the context ends (GIL released)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_countproxy",
                                    "The broker's counting proxy (see the file's header).", -1, methods};

PyMODINIT_FUNC PyInit__countproxy(void) { return PyModule_Create(&module); }
