/* The received-sample fast path of charles.proto.codec, in C.
 *
 * decode(frames) does what codec._decode_fast does, field for field: a message from zmq.Frame objects on
 * a topic the Python decoder has already seen, with a well-formed envelope, gives its Envelope; anything
 * else gives None, and the caller takes the precise Python path, which accepts it or names the reason.
 * Nothing is rejected here, so this file cannot disagree with the contract about what is valid, only
 * about how fast it says so (tests/test_proto_codec.py holds the two paths to the same answers).
 *
 * Samples are checked and built here; other kinds are handed to their Python decoder (codec._CODECS).
 * The header is unpacked by msgpack's own unpackb. Optional: when this does not compile (no C compiler,
 * e.g. on a Windows game PC), the package runs the same checks in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

static PyObject *g_topics;    /* dict: topic bytes -> (topic str, Topic entry, kind str, max_bytes int) */
static PyObject *g_unpackb;   /* msgpack.unpackb */
static PyObject *g_zframe;    /* zmq.Frame */
/* Sample, Frame and Envelope: held here so the builders below may point at them without a reference */
static PyObject *g_sample;
static PyObject *g_frame;
static PyObject *g_envelope;
static PyObject *g_codecs;    /* dict: kind -> (cls, out, in) */
static PyObject *g_history;   /* callable(blob, rows) -> float32 array, or None if not finite */
static long long g_version;
static Py_ssize_t g_max_header;
static int g_ready;

static PyObject *s_bytes, *s_buffer, *s_sample, *s_npc, *s_uint8, *s_float32, *s_raw, *s_jpeg, *s_png;
static PyObject *k_v, *k_kind, *k_sender, *k_t, *k_wall, *k_body;
static PyObject *k_frame, *k_steering, *k_throttle_brake, *k_speed, *k_game_time, *k_purpose, *k_collector,
    *k_seq, *k_codec, *k_shape, *k_blob, *k_stack, *k_previous, *k_source, *k_history, *k_dtype;

#define PI_BOUND (3.14159265358979323846 + 1e-6)

/* Building Sample, Frame and Envelope. They are slots dataclasses; calling one runs its generated
 * __init__, a Python frame that costs about a third of this whole decode. When a class is plain enough
 * (every field a slot holding an object, no __post_init__), the object is allocated and its slots are
 * filled directly, which is all that __init__ does; otherwise the class is called. */
#define MAX_FIELDS 16
typedef struct {
    PyTypeObject *type;
    Py_ssize_t nfields;
    Py_ssize_t offsets[MAX_FIELDS]; /* -1: call the class instead */
} Builder;

static Builder b_sample, b_frame, b_envelope;

static int builder_init(Builder *b, PyObject *cls) {
    b->type = (PyTypeObject *)cls;
    b->nfields = 0;
    b->offsets[0] = -1;
    PyObject *fields = PyObject_GetAttrString(cls, "__dataclass_fields__");
    if (fields == NULL || !PyDict_Check(fields)) {
        Py_XDECREF(fields);
        PyErr_Clear();
        return 0;
    }
    int direct = PyType_Check(cls) && PyDict_GET_SIZE(fields) <= MAX_FIELDS &&
                 !PyObject_HasAttrString(cls, "__post_init__");
    PyObject *name, *value;
    Py_ssize_t pos = 0, k = 0;
    while (direct && PyDict_Next(fields, &pos, &name, &value)) { /* dict order is field order */
        PyObject *d = PyDict_GetItem(((PyTypeObject *)cls)->tp_dict, name);
        if (d == NULL || !Py_IS_TYPE(d, &PyMemberDescr_Type)) {
            direct = 0;
            break;
        }
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type != T_OBJECT_EX || (m->flags & READONLY)) {
            direct = 0;
            break;
        }
        b->offsets[k++] = m->offset;
    }
    b->nfields = k;
    if (!direct) b->offsets[0] = -1;
    Py_DECREF(fields);
    return 1;
}

/* A new instance from its field values in order (borrowed; each stored with a new reference). */
static PyObject *build(Builder *b, PyObject *const *values, Py_ssize_t n) {
    if (b->offsets[0] < 0 || n != b->nfields) return PyObject_Vectorcall((PyObject *)b->type, values, n, NULL);
    PyObject *obj = b->type->tp_alloc(b->type, 0);
    if (obj == NULL) return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_INCREF(values[k]);
        *(PyObject **)((char *)obj + b->offsets[k]) = values[k];
    }
    return obj;
}

/* An exact float within [lo, hi] (NaN fails every comparison, so it is out). */
static int float_in(PyObject *o, double lo, double hi) {
    if (o == NULL || !PyFloat_CheckExact(o)) return 0;
    double v = PyFloat_AS_DOUBLE(o);
    return lo <= v && v <= hi;
}

/* An exact int within [lo, hi]. */
static int int_in(PyObject *o, long long lo, long long hi, long long *out) {
    if (o == NULL || !PyLong_CheckExact(o)) return 0;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    if (v < lo || v > hi) return 0;
    if (out) *out = v;
    return 1;
}

static int str_upto(PyObject *o, Py_ssize_t n) {
    return o != NULL && PyUnicode_CheckExact(o) && PyUnicode_GET_LENGTH(o) <= n;
}

static int str_is(PyObject *o, PyObject *s) {
    return o != NULL && PyUnicode_CheckExact(o) && PyUnicode_Compare(o, s) == 0;
}

/* The sample body checked in one pass; a new Sample, or NULL without an error set (not this path's),
 * or NULL with an error set (a real failure: memory, or the history helper raised). */
static PyObject *sample_in(PyObject *b, PyObject *blobs) {
    Py_ssize_t nblobs = PyList_GET_SIZE(blobs);
    if (PyDict_GET_SIZE(b) > 11 || PyDict_GetItem(b, k_stack) != NULL) return NULL;
    PyObject *f = PyDict_GetItem(b, k_frame);
    if (f == NULL || !PyDict_CheckExact(f)) return NULL;
    PyObject *st = PyDict_GetItem(b, k_steering), *tb = PyDict_GetItem(b, k_throttle_brake);
    PyObject *sp = PyDict_GetItem(b, k_speed), *gt = PyDict_GetItem(b, k_game_time);
    PyObject *pur = PyDict_GetItem(b, k_purpose), *col = PyDict_GetItem(b, k_collector);
    PyObject *seq = PyDict_GetItem(b, k_seq);
    if (!float_in(st, -1.0, 1.0) || !float_in(tb, -1.0, 1.0) || !float_in(sp, 0.0, 200.0) ||
        !float_in(gt, 0.0, 1e12))
        return NULL;
    if (pur == NULL || !PyList_CheckExact(pur) || PyList_GET_SIZE(pur) != 2) return NULL;
    PyObject *pa = PyList_GET_ITEM(pur, 0), *pd = PyList_GET_ITEM(pur, 1);
    if (!float_in(pa, -PI_BOUND, PI_BOUND) || !float_in(pd, 0.0, 1e7)) return NULL;
    if (!str_upto(col, 256) || !int_in(seq, 0, 0x7FFFFFFFFFFFFFFFLL, NULL)) return NULL;
    PyObject *src = PyDict_GetItem(b, k_source);
    if (src == NULL) src = s_npc;
    else if (!str_upto(src, 32)) return NULL;

    PyObject *codec = PyDict_GetItem(f, k_codec), *shape = PyDict_GetItem(f, k_shape);
    PyObject *idx = PyDict_GetItem(f, k_blob), *dtype = PyDict_GetItem(f, k_dtype);
    if (codec == NULL || !PyUnicode_CheckExact(codec)) return NULL;
    int is_raw = PyUnicode_Compare(codec, s_raw) == 0;
    if (!is_raw && PyUnicode_Compare(codec, s_jpeg) != 0 && PyUnicode_Compare(codec, s_png) != 0) return NULL;
    if (dtype != NULL && !str_is(dtype, s_uint8)) return NULL;
    if (shape == NULL || !PyList_CheckExact(shape) || PyList_GET_SIZE(shape) != 3) return NULL;
    long long h, w, c, i;
    if (!int_in(PyList_GET_ITEM(shape, 0), 1, 4096, &h) || !int_in(PyList_GET_ITEM(shape, 1), 1, 4096, &w) ||
        !int_in(PyList_GET_ITEM(shape, 2), 1, 3, &c) || c == 2 || !int_in(idx, 0, (long long)nblobs - 1, &i))
        return NULL;

    PyObject *pv = PyDict_GetItem(b, k_previous);
    if (pv == Py_None) pv = NULL;
    if (pv != NULL) {
        if (!PyList_CheckExact(pv) || PyList_GET_SIZE(pv) != 2 ||
            !float_in(PyList_GET_ITEM(pv, 0), -1.0, 1.0) || !float_in(PyList_GET_ITEM(pv, 1), -1.0, 1.0))
            return NULL;
    }
    PyObject *data = PyList_GET_ITEM(blobs, i);
    Py_ssize_t n = PyObject_Length(data);
    if (n < 0) {
        PyErr_Clear();
        return NULL;
    }
    if (n == 0 || (is_raw && n != h * w * c)) return NULL;

    PyObject *history = NULL; /* new reference when set */
    PyObject *hd = PyDict_GetItem(b, k_history);
    if (hd != NULL && hd != Py_None) {
        if (!PyDict_CheckExact(hd)) return NULL;
        PyObject *hs = PyDict_GetItem(hd, k_shape), *hb = PyDict_GetItem(hd, k_blob);
        if (hs == NULL || !PyList_CheckExact(hs) || PyList_GET_SIZE(hs) != 2) return NULL;
        long long rows, cols, hbi;
        if (!int_in(PyList_GET_ITEM(hs, 0), 0, 1024, &rows) || !int_in(PyList_GET_ITEM(hs, 1), 5, 5, &cols) ||
            !str_is(PyDict_GetItem(hd, k_dtype), s_float32) || !int_in(hb, 0, (long long)nblobs - 1, &hbi))
            return NULL;
        PyObject *hblob = PyList_GET_ITEM(blobs, hbi);
        Py_ssize_t hn = PyObject_Length(hblob);
        if (hn < 0) {
            PyErr_Clear();
            return NULL;
        }
        if (hn != rows * cols * 4) return NULL;
        history = PyObject_CallFunction(g_history, "OL", hblob, rows);
        if (history == NULL) return NULL; /* error set */
        if (history == Py_None) {          /* not finite: the precise path names it */
            Py_DECREF(history);
            return NULL;
        }
    }

    PyObject *result = NULL, *shape_t = NULL, *frame = NULL, *purpose = NULL, *prev = NULL, *stack = NULL;
    shape_t = Py_BuildValue("(LLL)", h, w, c);
    if (shape_t == NULL) goto done;
    PyObject *fargs[3] = {codec, shape_t, data};
    frame = build(&b_frame, fargs, 3);
    if (frame == NULL) goto done;
    purpose = PyTuple_Pack(2, pa, pd);
    if (purpose == NULL) goto done;
    if (pv != NULL) {
        prev = PyTuple_Pack(2, PyList_GET_ITEM(pv, 0), PyList_GET_ITEM(pv, 1));
        if (prev == NULL) goto done;
    }
    stack = PyList_New(0);
    if (stack == NULL) goto done;
    PyObject *sargs[12] = {col, seq, gt, frame, st, tb, sp, purpose, history ? history : Py_None, stack,
                           prev ? prev : Py_None, src};
    result = build(&b_sample, sargs, 12);
done:
    Py_XDECREF(history);
    Py_XDECREF(shape_t);
    Py_XDECREF(frame);
    Py_XDECREF(purpose);
    Py_XDECREF(prev);
    Py_XDECREF(stack);
    return result;
}

static PyObject *decode(PyObject *self, PyObject *frames) {
    if (!g_ready) Py_RETURN_NONE;
    if (!PyList_CheckExact(frames)) Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(frames);
    if (n < 3) Py_RETURN_NONE;
    for (Py_ssize_t k = 0; k < n; k++)
        if ((PyObject *)Py_TYPE(PyList_GET_ITEM(frames, k)) != g_zframe) Py_RETURN_NONE;

    PyObject *env = NULL, *topic_b = NULL, *known = NULL, *blobs = NULL, *header_b = NULL, *header = NULL,
             *msg = NULL;
    topic_b = PyObject_GetAttr(PyList_GET_ITEM(frames, 0), s_bytes);
    if (topic_b == NULL || !PyBytes_CheckExact(topic_b)) goto none;
    known = PyDict_GetItemWithError(g_topics, topic_b);
    if (known == NULL || !PyTuple_CheckExact(known) || PyTuple_GET_SIZE(known) != 4) {
        known = NULL;
        goto none;
    }
    Py_INCREF(known);
    PyObject *topic = PyTuple_GET_ITEM(known, 0), *kind_expected = PyTuple_GET_ITEM(known, 2);
    long long max_bytes;
    if (!PyUnicode_CheckExact(kind_expected) || !int_in(PyTuple_GET_ITEM(known, 3), 0, LLONG_MAX, &max_bytes))
        goto none;

    header_b = PyObject_GetAttr(PyList_GET_ITEM(frames, 1), s_buffer);
    if (header_b == NULL) goto none;
    Py_ssize_t hn = PyObject_Length(header_b);
    if (hn < 0) goto none;
    long long nbytes = (long long)PyBytes_GET_SIZE(topic_b) + hn;
    blobs = PyList_New(n - 2);
    if (blobs == NULL) goto fail;
    for (Py_ssize_t k = 2; k < n; k++) {
        PyObject *buf = PyObject_GetAttr(PyList_GET_ITEM(frames, k), s_buffer);
        if (buf == NULL) goto none;
        PyList_SET_ITEM(blobs, k - 2, buf);
        Py_ssize_t bn = PyObject_Length(buf);
        if (bn < 0) goto none;
        nbytes += bn;
    }
    if (nbytes > max_bytes || hn > g_max_header) goto none;

    header = PyObject_CallOneArg(g_unpackb, header_b);
    if (header == NULL || !PyDict_CheckExact(header)) goto none;
    PyObject *v = PyDict_GetItem(header, k_v), *kind = PyDict_GetItem(header, k_kind);
    PyObject *sender = PyDict_GetItem(header, k_sender), *t = PyDict_GetItem(header, k_t);
    PyObject *wall = PyDict_GetItem(header, k_wall), *body = PyDict_GetItem(header, k_body);
    if (!int_in(v, g_version, g_version, NULL) || !str_is(kind, kind_expected) || !str_upto(sender, 256) ||
        body == NULL || !PyDict_CheckExact(body))
        goto none;
    if (!PyFloat_CheckExact(t) || !PyFloat_CheckExact(wall)) goto none;
    double tv = PyFloat_AS_DOUBLE(t), wv = PyFloat_AS_DOUBLE(wall);
    if (!(-1e15 < tv && tv < 1e15 && -1e15 < wv && wv < 1e15)) goto none;

    if (PyUnicode_Compare(kind, s_sample) == 0) {
        msg = sample_in(body, blobs);
        if (msg == NULL) {
            if (PyErr_Occurred()) goto fail;
            goto none;
        }
    } else {
        PyObject *codec = PyDict_GetItemWithError(g_codecs, kind); /* borrowed */
        if (codec == NULL || !PyTuple_CheckExact(codec) || PyTuple_GET_SIZE(codec) != 3) goto none;
        msg = PyObject_CallFunctionObjArgs(PyTuple_GET_ITEM(codec, 2), body, blobs, NULL);
        if (msg == NULL) goto fail; /* ProtocolError from the kind's decoder: the caller's to handle */
    }
    PyObject *nb = PyLong_FromLongLong(nbytes);
    if (nb == NULL) goto fail;
    PyObject *eargs[7] = {topic, kind, sender, t, wall, msg, nb};
    env = build(&b_envelope, eargs, 7);
    Py_DECREF(nb);
    goto out;
none:
    PyErr_Clear();
    env = Py_None;
    Py_INCREF(env);
    goto out;
fail:
    env = NULL;
out:
    Py_XDECREF(topic_b);
    Py_XDECREF(known);
    Py_XDECREF(header_b);
    Py_XDECREF(blobs);
    Py_XDECREF(header);
    Py_XDECREF(msg);
    return env;
}

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *topics, *unpackb, *zframe, *sample, *frame, *envelope, *codecs, *history;
    long long version;
    Py_ssize_t max_header;
    if (!PyArg_ParseTuple(args, "O!OOOOOO!OLn", &PyDict_Type, &topics, &unpackb, &zframe, &sample, &frame,
                          &envelope, &PyDict_Type, &codecs, &history, &version, &max_header))
        return NULL;
    PyObject **slots[] = {&g_topics, &g_unpackb, &g_zframe, &g_sample, &g_frame, &g_envelope, &g_codecs, &g_history};
    PyObject *values[] = {topics, unpackb, zframe, sample, frame, envelope, codecs, history};
    for (size_t k = 0; k < sizeof(values) / sizeof(values[0]); k++) {
        Py_INCREF(values[k]);
        Py_XSETREF(*slots[k], values[k]);
    }
    g_version = version;
    g_max_header = max_header;
    g_ready = builder_init(&b_sample, sample) && builder_init(&b_frame, frame) && builder_init(&b_envelope, envelope);
    Py_RETURN_NONE;
}

static PyObject *direct(PyObject *self, PyObject *noargs) {
    return Py_BuildValue("{s:O,s:O,s:O}", "Sample", b_sample.offsets[0] >= 0 ? Py_True : Py_False, "Frame",
                         b_frame.offsets[0] >= 0 ? Py_True : Py_False, "Envelope",
                         b_envelope.offsets[0] >= 0 ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"direct", direct, METH_NOARGS, "which classes are built by filling their slots (not by calling them)"},
    {"configure", configure, METH_VARARGS,
     "configure(topics, unpackb, zmq_frame, Sample, Frame, Envelope, codecs, history, version, max_header)"},
    {"decode", decode, METH_O, "decode(frames) -> Envelope, or None to take the precise Python path"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastcodec", NULL, -1, methods};

#define INTERN(var, text)                                 \
    do {                                                  \
        if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL; \
    } while (0)

PyMODINIT_FUNC PyInit__fastcodec(void) {
    INTERN(s_bytes, "bytes");
    INTERN(s_buffer, "buffer");
    INTERN(s_sample, "sample");
    INTERN(s_npc, "npc");
    INTERN(s_uint8, "uint8");
    INTERN(s_float32, "float32");
    INTERN(s_raw, "raw");
    INTERN(s_jpeg, "jpeg");
    INTERN(s_png, "png");
    INTERN(k_v, "v");
    INTERN(k_kind, "kind");
    INTERN(k_sender, "sender");
    INTERN(k_t, "t");
    INTERN(k_wall, "wall");
    INTERN(k_body, "body");
    INTERN(k_frame, "frame");
    INTERN(k_steering, "steering");
    INTERN(k_throttle_brake, "throttle_brake");
    INTERN(k_speed, "speed");
    INTERN(k_game_time, "game_time");
    INTERN(k_purpose, "purpose");
    INTERN(k_collector, "collector");
    INTERN(k_seq, "seq");
    INTERN(k_codec, "codec");
    INTERN(k_shape, "shape");
    INTERN(k_blob, "blob");
    INTERN(k_stack, "stack");
    INTERN(k_previous, "previous");
    INTERN(k_source, "source");
    INTERN(k_history, "history");
    INTERN(k_dtype, "dtype");
    return PyModule_Create(&module);
}
