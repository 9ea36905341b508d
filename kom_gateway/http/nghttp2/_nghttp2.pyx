# cython: language_level=3, cdivision=True
"""libnghttp2 sessions for the HTTP/2 engine `nghttp2` (see `server.py`, `client.py` beside it).

nghttp2 parses, validates and frames; Python is told once per frame event, never per
header. Callbacks run inside `receive()` / `send()` and only gather: a header block becomes
one list, each frame event one `Event` (the vocabulary of kom_gateway/http/events.py),
each fully framed write's callback one entry for `run_flushed`. Python then acts on the
events (`HTTP2ServerConnection._handle`, `HTTP2ClientConnection._handle`) once nghttp2 has
returned: the binding calls no Python code but the producers' `on_flushed` callbacks,
nothing runs re-entrantly inside nghttp2 and no exception crosses it.

Window updates are manual (`consume`): the connection and stream windows reopen only for
bytes the other side has actually taken, so a reader that stops stalls only its own stream.
Outgoing bodies wait in a per-stream `_Outgoing` queue that nghttp2 pulls from through a
data provider; an empty queue defers the stream (never a 0-byte read without EOF, which
would make nghttp2 emit empty DATA frames forever) until `write` resumes it.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.unicode cimport PyUnicode_DecodeLatin1
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy

from collections import deque

from kom_gateway.http.settings import NEVER_INDEXED

# Our declarations of the part of libnghttp2's ABI (soname 14) used here, so that the
# extension builds where only the runtime library is installed (as on every machine with
# curl). tests/test_nghttp2_abi.py checks every layout and constant below against
# <nghttp2/nghttp2.h> wherever that header is installed.
cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    #include <sys/types.h>
    typedef struct nghttp2_session nghttp2_session;
    typedef struct nghttp2_session_callbacks nghttp2_session_callbacks;
    typedef struct nghttp2_option nghttp2_option;
    typedef struct nghttp2_stream nghttp2_stream;
    typedef struct { uint8_t *name; uint8_t *value; size_t namelen; size_t valuelen;
                     uint8_t flags; } nghttp2_nv;
    typedef struct { size_t length; int32_t stream_id; uint8_t type; uint8_t flags;
                     uint8_t reserved; } nghttp2_frame_hd;
    typedef struct { int32_t stream_id; int32_t weight; uint8_t exclusive; }
        nghttp2_priority_spec;
    typedef struct { nghttp2_frame_hd hd; size_t padlen; } nghttp2_data;
    typedef struct { nghttp2_frame_hd hd; size_t padlen; nghttp2_priority_spec pri_spec;
                     nghttp2_nv *nva; size_t nvlen; int cat; } nghttp2_headers;
    typedef struct { nghttp2_frame_hd hd; uint32_t error_code; } nghttp2_rst_stream;
    typedef struct { nghttp2_frame_hd hd; uint8_t opaque_data[8]; } nghttp2_ping;
    typedef struct { nghttp2_frame_hd hd; int32_t last_stream_id; uint32_t error_code;
                     uint8_t *opaque_data; size_t opaque_data_len; uint8_t reserved; }
        nghttp2_goaway;
    typedef struct { int32_t settings_id; uint32_t value; } nghttp2_settings_entry;
    typedef union { nghttp2_frame_hd hd; nghttp2_data data; nghttp2_headers headers;
                    nghttp2_rst_stream rst_stream; nghttp2_ping ping;
                    nghttp2_goaway goaway; } nghttp2_frame;
    typedef union { int fd; void *ptr; } nghttp2_data_source;
    typedef ssize_t (*nghttp2_data_source_read_callback)(
        nghttp2_session *, int32_t, uint8_t *, size_t, uint32_t *, nghttp2_data_source *,
        void *);
    typedef struct { nghttp2_data_source source;
                     nghttp2_data_source_read_callback read_callback; }
        nghttp2_data_provider;
    typedef int (*nghttp2_on_frame_recv_callback)(nghttp2_session *, const nghttp2_frame *,
                                                  void *);
    typedef int (*nghttp2_on_begin_headers_callback)(nghttp2_session *,
                                                     const nghttp2_frame *, void *);
    typedef int (*nghttp2_on_header_callback)(nghttp2_session *, const nghttp2_frame *,
                                              const uint8_t *, size_t, const uint8_t *,
                                              size_t, uint8_t, void *);
    typedef int (*nghttp2_on_data_chunk_recv_callback)(nghttp2_session *, uint8_t, int32_t,
                                                       const uint8_t *, size_t, void *);
    typedef int (*nghttp2_on_stream_close_callback)(nghttp2_session *, int32_t, uint32_t,
                                                    void *);
    int nghttp2_session_callbacks_new(nghttp2_session_callbacks **);
    void nghttp2_session_callbacks_del(nghttp2_session_callbacks *);
    void nghttp2_session_callbacks_set_on_frame_recv_callback(
        nghttp2_session_callbacks *, nghttp2_on_frame_recv_callback);
    void nghttp2_session_callbacks_set_on_begin_headers_callback(
        nghttp2_session_callbacks *, nghttp2_on_begin_headers_callback);
    void nghttp2_session_callbacks_set_on_header_callback(
        nghttp2_session_callbacks *, nghttp2_on_header_callback);
    void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(
        nghttp2_session_callbacks *, nghttp2_on_data_chunk_recv_callback);
    void nghttp2_session_callbacks_set_on_stream_close_callback(
        nghttp2_session_callbacks *, nghttp2_on_stream_close_callback);
    int nghttp2_option_new(nghttp2_option **);
    void nghttp2_option_del(nghttp2_option *);
    void nghttp2_option_set_no_auto_window_update(nghttp2_option *, int);
    void nghttp2_option_set_peer_max_concurrent_streams(nghttp2_option *, uint32_t);
    void nghttp2_option_set_max_send_header_block_length(nghttp2_option *, size_t);
    void nghttp2_option_set_no_closed_streams(nghttp2_option *, int);
    void nghttp2_option_set_stream_reset_rate_limit(nghttp2_option *, uint64_t, uint64_t);
    void nghttp2_option_set_max_continuations(nghttp2_option *, size_t);
    void nghttp2_option_set_max_outbound_ack(nghttp2_option *, size_t);
    int nghttp2_session_server_new2(nghttp2_session **, const nghttp2_session_callbacks *,
                                    void *, const nghttp2_option *);
    int nghttp2_session_client_new2(nghttp2_session **, const nghttp2_session_callbacks *,
                                    void *, const nghttp2_option *);
    void nghttp2_session_del(nghttp2_session *);
    ssize_t nghttp2_session_mem_recv(nghttp2_session *, const uint8_t *, size_t);
    ssize_t nghttp2_session_mem_send(nghttp2_session *, const uint8_t **);
    int nghttp2_session_resume_data(nghttp2_session *, int32_t);
    int nghttp2_session_want_read(nghttp2_session *);
    int nghttp2_session_want_write(nghttp2_session *);
    nghttp2_stream *nghttp2_session_find_stream(nghttp2_session *, int32_t);
    int nghttp2_session_consume(nghttp2_session *, int32_t, size_t);
    int nghttp2_session_set_local_window_size(nghttp2_session *, uint8_t, int32_t, int32_t);
    uint32_t nghttp2_session_get_remote_settings(nghttp2_session *, int);
    int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *);
    int32_t nghttp2_session_get_stream_remote_window_size(nghttp2_session *, int32_t);
    int32_t nghttp2_session_get_local_window_size(nghttp2_session *);
    uint32_t nghttp2_session_get_local_settings(nghttp2_session *, int);
    int nghttp2_submit_settings(nghttp2_session *, uint8_t, const nghttp2_settings_entry *,
                                size_t);
    int32_t nghttp2_submit_request(nghttp2_session *, const nghttp2_priority_spec *,
                                   const nghttp2_nv *, size_t, const nghttp2_data_provider *,
                                   void *);
    int nghttp2_submit_response(nghttp2_session *, int32_t, const nghttp2_nv *, size_t,
                                const nghttp2_data_provider *);
    int nghttp2_submit_rst_stream(nghttp2_session *, uint8_t, int32_t, uint32_t);
    int nghttp2_submit_ping(nghttp2_session *, uint8_t, const uint8_t *);
    int nghttp2_submit_goaway(nghttp2_session *, uint8_t, int32_t, uint32_t, const uint8_t *,
                              size_t);
    int nghttp2_submit_shutdown_notice(nghttp2_session *);
    const char *nghttp2_strerror(int);
    """
    ctypedef struct nghttp2_session
    ctypedef struct nghttp2_session_callbacks
    ctypedef struct nghttp2_option
    ctypedef struct nghttp2_stream
    ctypedef struct nghttp2_nv:
        uint8_t *name
        uint8_t *value
        size_t namelen
        size_t valuelen
        uint8_t flags
    ctypedef struct nghttp2_frame_hd:
        size_t length
        int32_t stream_id
        uint8_t type
        uint8_t flags
    ctypedef struct nghttp2_priority_spec:
        pass
    ctypedef struct nghttp2_headers:
        nghttp2_frame_hd hd
        int cat
    ctypedef struct nghttp2_rst_stream:
        nghttp2_frame_hd hd
        uint32_t error_code
    ctypedef struct nghttp2_ping:
        nghttp2_frame_hd hd
        uint8_t opaque_data[8]
    ctypedef struct nghttp2_goaway:
        nghttp2_frame_hd hd
        int32_t last_stream_id
        uint32_t error_code
        uint8_t *opaque_data
        size_t opaque_data_len
    ctypedef struct nghttp2_settings_entry:
        int32_t settings_id
        uint32_t value
    ctypedef union nghttp2_frame:
        nghttp2_frame_hd hd
        nghttp2_headers headers
        nghttp2_rst_stream rst_stream
        nghttp2_ping ping
        nghttp2_goaway goaway
    ctypedef union nghttp2_data_source:
        void *ptr
    ctypedef ssize_t (*nghttp2_data_source_read_callback)(
        nghttp2_session *, int32_t, uint8_t *, size_t, uint32_t *, nghttp2_data_source *,
        void *) noexcept
    ctypedef struct nghttp2_data_provider:
        nghttp2_data_source source
        nghttp2_data_source_read_callback read_callback
    ctypedef int (*nghttp2_on_frame_recv_callback)(
        nghttp2_session *, const nghttp2_frame *, void *) noexcept
    ctypedef int (*nghttp2_on_begin_headers_callback)(
        nghttp2_session *, const nghttp2_frame *, void *) noexcept
    ctypedef int (*nghttp2_on_header_callback)(
        nghttp2_session *, const nghttp2_frame *, const uint8_t *, size_t, const uint8_t *,
        size_t, uint8_t, void *) noexcept
    ctypedef int (*nghttp2_on_data_chunk_recv_callback)(
        nghttp2_session *, uint8_t, int32_t, const uint8_t *, size_t, void *) noexcept
    ctypedef int (*nghttp2_on_stream_close_callback)(
        nghttp2_session *, int32_t, uint32_t, void *) noexcept
    int nghttp2_session_callbacks_new(nghttp2_session_callbacks **)
    void nghttp2_session_callbacks_del(nghttp2_session_callbacks *)
    void nghttp2_session_callbacks_set_on_frame_recv_callback(
        nghttp2_session_callbacks *, nghttp2_on_frame_recv_callback)
    void nghttp2_session_callbacks_set_on_begin_headers_callback(
        nghttp2_session_callbacks *, nghttp2_on_begin_headers_callback)
    void nghttp2_session_callbacks_set_on_header_callback(
        nghttp2_session_callbacks *, nghttp2_on_header_callback)
    void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(
        nghttp2_session_callbacks *, nghttp2_on_data_chunk_recv_callback)
    void nghttp2_session_callbacks_set_on_stream_close_callback(
        nghttp2_session_callbacks *, nghttp2_on_stream_close_callback)
    int nghttp2_option_new(nghttp2_option **)
    void nghttp2_option_del(nghttp2_option *)
    void nghttp2_option_set_no_auto_window_update(nghttp2_option *, int)
    void nghttp2_option_set_peer_max_concurrent_streams(nghttp2_option *, uint32_t)
    void nghttp2_option_set_max_send_header_block_length(nghttp2_option *, size_t)
    void nghttp2_option_set_no_closed_streams(nghttp2_option *, int)
    void nghttp2_option_set_stream_reset_rate_limit(nghttp2_option *, uint64_t, uint64_t)
    void nghttp2_option_set_max_continuations(nghttp2_option *, size_t)
    void nghttp2_option_set_max_outbound_ack(nghttp2_option *, size_t)
    int nghttp2_session_server_new2(nghttp2_session **, const nghttp2_session_callbacks *,
                                    void *, const nghttp2_option *)
    int nghttp2_session_client_new2(nghttp2_session **, const nghttp2_session_callbacks *,
                                    void *, const nghttp2_option *)
    void nghttp2_session_del(nghttp2_session *)
    ssize_t nghttp2_session_mem_recv(nghttp2_session *, const uint8_t *, size_t)
    ssize_t nghttp2_session_mem_send(nghttp2_session *, const uint8_t **)
    int nghttp2_session_resume_data(nghttp2_session *, int32_t)
    int nghttp2_session_want_read(nghttp2_session *)
    int nghttp2_session_want_write(nghttp2_session *)
    nghttp2_stream *nghttp2_session_find_stream(nghttp2_session *, int32_t)
    int nghttp2_session_consume(nghttp2_session *, int32_t, size_t)
    int nghttp2_session_set_local_window_size(nghttp2_session *, uint8_t, int32_t, int32_t)
    uint32_t nghttp2_session_get_remote_settings(nghttp2_session *, int)
    int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *)
    int32_t nghttp2_session_get_stream_remote_window_size(nghttp2_session *, int32_t)
    int32_t nghttp2_session_get_local_window_size(nghttp2_session *)
    uint32_t nghttp2_session_get_local_settings(nghttp2_session *, int)
    int nghttp2_submit_settings(nghttp2_session *, uint8_t, const nghttp2_settings_entry *,
                                size_t)
    int32_t nghttp2_submit_request(nghttp2_session *, const nghttp2_priority_spec *,
                                   const nghttp2_nv *, size_t, const nghttp2_data_provider *,
                                   void *)
    int nghttp2_submit_response(nghttp2_session *, int32_t, const nghttp2_nv *, size_t,
                                const nghttp2_data_provider *)
    int nghttp2_submit_rst_stream(nghttp2_session *, uint8_t, int32_t, uint32_t)
    int nghttp2_submit_ping(nghttp2_session *, uint8_t, const uint8_t *)
    int nghttp2_submit_goaway(nghttp2_session *, uint8_t, int32_t, uint32_t, const uint8_t *,
                              size_t)
    int nghttp2_submit_shutdown_notice(nghttp2_session *)
    const char *nghttp2_strerror(int)

# frame types, flags, settings, errors (RFC 9113; checked against the header by the tests)
cdef enum:
    T_DATA = 0
    T_HEADERS = 1
    T_PRIORITY = 2
    T_RST_STREAM = 3
    T_SETTINGS = 4
    T_PING = 6
    T_GOAWAY = 7
    T_WINDOW_UPDATE = 8
    F_END_STREAM = 0x01
    F_ACK = 0x01
    CAT_REQUEST = 0
    CAT_RESPONSE = 1
    NV_NO_INDEX = 0x01
    DATA_FLAG_EOF = 0x01
    ERR_DEFERRED = -508
    ERR_CALLBACK_FAILURE = -902
    ERR_BAD_CLIENT_MAGIC = -903
    ERR_FLOODED = -904
    ERR_TOO_MANY_CONTINUATIONS = -905

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

# Event kinds: the numbers of kom_gateway/http/events.py (tests/test_engine_events.py
# checks they agree), as C constants for the callbacks.
cdef enum:
    _EV_HEADERS = 1
    _EV_DATA = 2
    _EV_END = 3
    _EV_CLOSE = 4
    _EV_GOAWAY = 5
    _EV_PING_ACK = 6
    _EV_SETTINGS = 7
    _EV_RESET = 8
    _EV_PING = 9
    _EV_WINDOW_UPDATE = 10
    _EV_PRIORITY = 11


cdef class Event:
    """One thing the peer did (kom_gateway/http/events.py says what each kind carries).
    Made in C with no Python call; Python only reads it."""
    cdef readonly int kind
    cdef readonly int32_t stream_id
    cdef readonly bint end_stream
    cdef readonly list headers
    cdef readonly str method, path, authority
    cdef readonly int status
    cdef readonly bytes data
    cdef readonly Py_ssize_t flow_len
    cdef readonly uint32_t error_code
    cdef readonly int32_t last_stream_id

    def __repr__(self):
        return f"Event({self.kind}, stream {self.stream_id})"


cdef bytes _EMPTY = b""


cdef inline Event _event(int kind, int32_t stream_id):
    cdef Event ev = Event.__new__(Event)
    ev.kind = kind
    ev.stream_id = stream_id
    ev.method = ev.path = ev.authority = ""
    ev.data = _EMPTY
    return ev


# Header names in (nearly) every Kubernetes request or response, kube-apiserver's and
# client-go's: one of these arrives as this very bytes object instead of a new one (no
# allocation per header, and its hash, which the proxy's header filters need, is
# computed once). Indexed by length.
_COMMON_NAMES = (
    b"accept", b"accept-encoding", b"accept-ranges", b"audit-id", b"authorization",
    b"cache-control", b"content-encoding", b"content-length", b"content-type", b"date",
    b"etag", b"kubectl-command", b"kubectl-session", b"last-modified", b"location",
    b"retry-after", b"server", b"user-agent", b"vary", b"warning",
    b"x-kubernetes-pf-flowschema-uid", b"x-kubernetes-pf-prioritylevel-uid",
)
cdef enum:
    _LONGEST_COMMON = 40
cdef tuple _NAMES_BY_LENGTH = tuple(
    tuple(n for n in _COMMON_NAMES if len(n) == length) for length in range(_LONGEST_COMMON)
)


cdef bytes _header_name(const uint8_t *name, size_t namelen):
    """`name` as bytes: the shared object if it is a common name, else a new one."""
    cdef bytes common
    if namelen < _LONGEST_COMMON:
        for common in <tuple>_NAMES_BY_LENGTH[namelen]:
            if memcmp(PyBytes_AS_STRING(common), name, namelen) == 0:
                return common
    return PyBytes_FromStringAndSize(<const char *>name, namelen)


# what a failed receive() says about the peer, for the abuse counters
CONTINUATION_FLOOD = ERR_TOO_MANY_CONTINUATIONS
FLOODED = ERR_FLOODED



class SessionError(Exception):
    """nghttp2 ended the connection (a protocol, compression or flood error). `code` is
    nghttp2's error number; a GOAWAY saying why is queued for `send()`."""

    def __init__(self, code: int) -> None:
        super().__init__(nghttp2_strerror(code).decode())
        self.code = code


cdef class _Outgoing:
    """One stream's body waiting to be framed: (data, on_flushed) items, and whether the
    body ends once they are out."""
    cdef object items
    cdef Py_ssize_t offset
    cdef public bint eof
    cdef bint deferred
    cdef public Py_ssize_t queued

    def __cinit__(self):
        self.items = deque()


cdef class Session:
    """One HTTP/2 connection's state machine (server or client side)."""
    cdef nghttp2_session *_s
    cdef list _events  # Events gathered since they were last taken
    cdef list _flushed  # on_flushed callbacks whose data has been framed
    cdef dict _out  # stream id -> _Outgoing
    cdef list _headers  # the header block being received (regular fields)
    cdef object _method, _path, _authority  # its pseudo-header fields (str)
    cdef int _status
    cdef size_t _header_bytes
    cdef size_t max_header_list
    cdef object _error
    cdef readonly uint64_t data_received, data_consumed  # DATA bytes in, and credited back

    def __cinit__(self, bint server, size_t max_header_list=1 << 20,
                  size_t max_send_header_block=(1 << 20) + 65536):
        cdef nghttp2_session_callbacks *cbs
        cdef nghttp2_option *opt
        cdef int rv
        self._s = NULL
        self._events = []
        self._flushed = []
        self._out = {}
        self._headers = None
        self.max_header_list = max_header_list
        if nghttp2_session_callbacks_new(&cbs) != 0:
            raise MemoryError()
        nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, _on_frame_recv)
        nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, _on_begin_headers)
        nghttp2_session_callbacks_set_on_header_callback(cbs, _on_header)
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, _on_data_chunk)
        nghttp2_session_callbacks_set_on_stream_close_callback(cbs, _on_stream_close)
        if nghttp2_option_new(&opt) != 0:
            nghttp2_session_callbacks_del(cbs)
            raise MemoryError()
        nghttp2_option_set_no_auto_window_update(opt, 1)
        nghttp2_option_set_no_closed_streams(opt, 1)
        nghttp2_option_set_max_send_header_block_length(opt, max_send_header_block)
        # a header list up to the limit may span this many CONTINUATION frames (the
        # smallest frame is 16 KiB); past them the peer is flooding
        nghttp2_option_set_max_continuations(opt, max_header_list // 16384 + 8)
        # rapid reset is judged by the gateway's own budget (http/guard.py), counted in metrics
        nghttp2_option_set_stream_reset_rate_limit(opt, 1 << 62, 1 << 62)
        if not server:
            # until the server's SETTINGS say otherwise, assume kube-apiserver's limit
            nghttp2_option_set_peer_max_concurrent_streams(opt, 100)
        if server:
            rv = nghttp2_session_server_new2(&self._s, cbs, <void *>self, opt)
        else:
            rv = nghttp2_session_client_new2(&self._s, cbs, <void *>self, opt)
        nghttp2_option_del(opt)
        nghttp2_session_callbacks_del(cbs)
        if rv != 0:
            self._s = NULL
            raise MemoryError()

    def __dealloc__(self):
        if self._s != NULL:
            nghttp2_session_del(self._s)
            self._s = NULL

    @property
    def closed(self) -> bool:
        return self._s == NULL

    def close(self) -> None:
        """Free the session. Every later call is a harmless no-op (a flush scheduled
        before the connection dropped must not touch freed memory).

        Order matters: nghttp2 holds each open stream's `_Outgoing` as a borrowed
        pointer (its data source), kept alive only by `self._out`, where it stays from
        submit until the stream's close callback (an entry is never replaced: `respond`
        refuses a stream that has one). So the session is deleted first (nothing reads
        those pointers after), and `_out` cleared after."""
        cdef _Outgoing out
        if self._s != NULL:
            nghttp2_session_del(self._s)  # calls no stream-close callback: free our side here
            self._s = NULL
        for out in self._out.values():  # never sent: its producers get their credit back
            for _, on_flushed in out.items:
                if on_flushed is not None:
                    self._flushed.append(on_flushed)
            out.items.clear()
        self._out.clear()

    # -- input ---------------------------------------------------------------------------
    def receive(self, object data not None) -> list:
        """Feed bytes from the peer; returns the events they produced. Raises
        SessionError when nghttp2 ends the connection (what it had gathered until then
        is still there for `take_events`). `data`: bytes (what the loop reads), or any
        contiguous buffer (a typed memoryview argument would cost a memoryview object
        and a format check per call)."""
        cdef ssize_t rv
        cdef Py_buffer view
        if self._s == NULL:
            return []
        if PyBytes_CheckExact(data):
            if PyBytes_GET_SIZE(data) == 0:
                return []
            rv = nghttp2_session_mem_recv(
                self._s, <const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        else:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                if view.len == 0:
                    return []
                rv = nghttp2_session_mem_recv(self._s, <const uint8_t *>view.buf, view.len)
            finally:
                PyBuffer_Release(&view)
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if rv < 0:
            raise SessionError(rv)
        return self.take_events()

    def take_events(self) -> list:
        """The events gathered since the last call (`send` gathers the closes of streams
        whose last frame it framed)."""
        events = self._events
        if events:
            self._events = []
        return events

    # -- output --------------------------------------------------------------------------
    def send(self) -> bytes:
        """Everything nghttp2 has to send now, framed, as one buffer ("" when nothing)."""
        cdef const uint8_t *chunk
        cdef ssize_t n
        cdef list parts
        if self._s == NULL:
            return b""
        n = nghttp2_session_mem_send(self._s, &chunk)
        if n <= 0:
            self._raise_pending(n)
            return b""
        first = PyBytes_FromStringAndSize(<const char *>chunk, n)
        n = nghttp2_session_mem_send(self._s, &chunk)
        if n <= 0:
            self._raise_pending(n)
            return first
        parts = [first]
        while n > 0:
            parts.append(PyBytes_FromStringAndSize(<const char *>chunk, n))
            n = nghttp2_session_mem_send(self._s, &chunk)
        self._raise_pending(n)
        return b"".join(parts)

    cdef _raise_pending(self, ssize_t n):
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if n < 0:
            raise SessionError(n)

    def run_flushed(self) -> None:
        """Tell producers their data has been framed, or will never be sent (upstream,
        that credits the windows back). Called outside nghttp2, never from a callback."""
        flushed = self._flushed
        if flushed:
            self._flushed = []
            for on_flushed in flushed:
                on_flushed()

    def flushed_pending(self) -> int:
        """How many producers `run_flushed` would tell now."""
        return len(self._flushed)

    def want_write(self) -> bool:
        """True when nghttp2 has frames to send (a read may have queued a SETTINGS or
        PING acknowledgement, a WINDOW_UPDATE or a RST_STREAM; most queue nothing)."""
        return self._s != NULL and nghttp2_session_want_write(self._s) != 0

    def want_io(self) -> bool:
        """False once nghttp2 has nothing left to read or write (after GOAWAY)."""
        if self._s == NULL:
            return False
        return bool(nghttp2_session_want_read(self._s) or nghttp2_session_want_write(self._s))

    # -- settings and connection-level frames -------------------------------------------
    def submit_settings(self, settings) -> None:
        cdef nghttp2_settings_entry iv[8]
        cdef size_t n = 0
        if self._s == NULL:
            return
        for key, value in settings:
            if n == 8:
                break
            iv[n].settings_id = key
            iv[n].value = value
            n += 1
        _check(nghttp2_submit_settings(self._s, 0, iv, n))

    def set_connection_window(self, int32_t size) -> None:
        if self._s != NULL:
            _check(nghttp2_session_set_local_window_size(self._s, 0, 0, size))

    def remote_max_concurrent_streams(self) -> int:
        if self._s == NULL:
            return 0
        return nghttp2_session_get_remote_settings(self._s, SETTINGS_MAX_CONCURRENT_STREAMS)

    def last_proc_stream_id(self) -> int:
        return 0 if self._s == NULL else nghttp2_session_get_last_proc_stream_id(self._s)

    def ping(self, bytes payload not None) -> None:
        if self._s != NULL and PyBytes_GET_SIZE(payload) == 8:
            _check(nghttp2_submit_ping(self._s, 0, <const uint8_t *>PyBytes_AS_STRING(payload)))

    def shutdown_notice(self) -> None:
        """GOAWAY with the largest stream id (first phase of a graceful shutdown; a plain
        GOAWAY's id is capped by nghttp2 at the last stream received)."""
        if self._s != NULL:
            nghttp2_submit_shutdown_notice(self._s)

    def goaway(self, int32_t last_stream_id, uint32_t error_code=0,
               bytes debug not None=b"") -> None:
        if self._s != NULL:
            nghttp2_submit_goaway(self._s, 0, last_stream_id, error_code,
                                  <const uint8_t *>PyBytes_AS_STRING(debug),
                                  PyBytes_GET_SIZE(debug))

    # -- streams -------------------------------------------------------------------------
    def respond(self, int32_t stream_id, list headers, bint end_stream) -> bool:
        """Submit response headers; with a body to follow unless `end_stream`. False if
        the stream is gone, was never opened, or has its response already (the body
        queue nghttp2 reads from must stay the one it was given: see `close`)."""
        cdef nghttp2_data_provider prd
        cdef _Outgoing out
        if (self._s == NULL or stream_id in self._out
                or nghttp2_session_find_stream(self._s, stream_id) == NULL):
            return False
        cdef nghttp2_nv *nva = _nv_array(headers)
        cdef size_t n = len(headers)
        cdef int rv
        try:
            if end_stream:
                rv = nghttp2_submit_response(self._s, stream_id, nva, n, NULL)
            else:
                out = _Outgoing()
                prd.source.ptr = <void *>out
                prd.read_callback = _read_body
                rv = nghttp2_submit_response(self._s, stream_id, nva, n, &prd)
                if rv == 0:
                    self._out[stream_id] = out
        finally:
            free(nva)
        return rv == 0

    def request(self, list headers, bint end_stream) -> int:
        """Submit a request; its stream id (a body follows unless `end_stream`), or a
        negative nghttp2 error (e.g. stream ids exhausted, session going away)."""
        cdef nghttp2_data_provider prd
        cdef _Outgoing out = None
        cdef int32_t stream_id
        if self._s == NULL:
            return -1
        cdef nghttp2_nv *nva = _nv_array(headers)
        cdef size_t n = len(headers)
        try:
            if end_stream:
                stream_id = nghttp2_submit_request(self._s, NULL, nva, n, NULL, NULL)
            else:
                out = _Outgoing()
                prd.source.ptr = <void *>out
                prd.read_callback = _read_body
                stream_id = nghttp2_submit_request(self._s, NULL, nva, n, &prd, NULL)
        finally:
            free(nva)
        if stream_id > 0 and out is not None:
            self._out[stream_id] = out
        return stream_id

    def write(self, int32_t stream_id, bytes data not None, on_flushed) -> bool:
        """Queue body bytes (kept by reference, not copied here);
        `on_flushed` lands in `flushed` once they are framed. False if the stream is gone."""
        cdef _Outgoing out = self._out.get(stream_id)
        if out is None or out.eof:
            return False
        out.items.append((data, on_flushed))
        out.queued += len(data)
        self._wake(out, stream_id)
        return True

    def end(self, int32_t stream_id) -> bool:
        """End the body once what is queued is out."""
        cdef _Outgoing out = self._out.get(stream_id)
        if out is None:
            return False
        out.eof = True
        self._wake(out, stream_id)
        return True

    cdef void _wake(self, _Outgoing out, int32_t stream_id):
        """A stream whose data provider deferred (nothing queued) has something again."""
        if out.deferred:
            out.deferred = False
            nghttp2_session_resume_data(self._s, stream_id)

    def queued(self, int32_t stream_id) -> int:
        """Body bytes waiting for the peer's window on `stream_id`."""
        cdef _Outgoing out = self._out.get(stream_id)
        return 0 if out is None else out.queued

    def queued_total(self) -> int:
        """Body bytes waiting for the peer's windows on every stream: one call where a
        connection checks each second whether its client keeps it waiting (a call
        per stream cost ~800 instructions a connection at every clock tick)."""
        cdef Py_ssize_t total = 0
        cdef _Outgoing out
        for out in self._out.values():
            total += out.queued
        return total

    def reset(self, int32_t stream_id, uint32_t error_code) -> None:
        if self._s != NULL:
            nghttp2_submit_rst_stream(self._s, 0, stream_id, error_code)

    def consume(self, int32_t stream_id, size_t size) -> bool:
        """`size` received bytes were taken: reopen the windows by that much (the
        connection's even when the stream is gone, or the connection would shrink).
        True when nghttp2 now has frames to send: it queues a WINDOW_UPDATE only once
        half a window is consumed, so most acknowledgements need no flush."""
        if self._s == NULL:
            return False
        if size:
            nghttp2_session_consume(self._s, stream_id, size)
            self.data_consumed += size
        return nghttp2_session_want_write(self._s) != 0

    def receive_window(self) -> int:
        """Connection-level DATA the peer may still send before our next WINDOW_UPDATE."""
        return 0 if self._s == NULL else nghttp2_session_get_local_window_size(self._s)

    def local_setting(self, int key) -> int:
        """One of our SETTINGS as the peer has acknowledged it."""
        return 0 if self._s == NULL else nghttp2_session_get_local_settings(self._s, key)


cdef int _check(int rv) except -1:
    if rv < 0:
        raise SessionError(rv)
    return 0


cdef nghttp2_nv *_nv_array(list headers) except NULL:
    """Headers as nghttp2_nv pointing into the list's bytes (nghttp2 copies them on
    submit); the caller frees the array."""
    cdef Py_ssize_t n = len(headers), i
    cdef nghttp2_nv *nva = <nghttp2_nv *>malloc(sizeof(nghttp2_nv) * (n if n else 1))
    cdef bytes name, value
    if nva == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            name, value = headers[i]  # TypeError unless a pair of bytes (None included)
            if name is None or value is None:
                raise TypeError("a header is a pair of bytes")
            nva[i].name = <uint8_t *>PyBytes_AS_STRING(name)
            nva[i].namelen = PyBytes_GET_SIZE(name)
            nva[i].value = <uint8_t *>PyBytes_AS_STRING(value)
            nva[i].valuelen = PyBytes_GET_SIZE(value)
            nva[i].flags = NV_NO_INDEX if name in NEVER_INDEXED else 0
    except BaseException:
        free(nva)  # the caller frees only what it was given
        raise
    return nva


cdef int _status_code(const uint8_t *value, size_t length) noexcept:
    """:status as a number (nghttp2 has checked it is three digits)."""
    cdef int code = 0
    cdef size_t i
    for i in range(length):
        code = code * 10 + (value[i] - 48)
    return code


# -- callbacks (called by nghttp2 inside receive()/send(); they only gather) -------------
cdef int _on_begin_headers(nghttp2_session *s, const nghttp2_frame *frame,
                           void *user_data) noexcept:
    cdef Session self = <Session>user_data
    try:
        self._headers = []
        self._method = self._path = self._authority = ""
        self._status = 0
        self._header_bytes = 0
    except BaseException as exc:  # (a MemoryError): as every callback, never raise into C
        self._error = exc
        return ERR_CALLBACK_FAILURE
    return 0


cdef int _on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name,
                    size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                    void *user_data) noexcept:
    cdef Session self = <Session>user_data
    if self._headers is None:  # over the limit already: the rest is not kept
        return 0
    self._header_bytes += namelen + valuelen + 32  # RFC 9113 6.5.2's accounting
    if self._header_bytes > self.max_header_list:
        self._headers = None
        return 0
    try:
        if namelen and name[0] == 58:  # b":" (nghttp2 has checked which ones may appear)
            if namelen == 7 and memcmp(name, b":method", 7) == 0:
                self._method = PyUnicode_DecodeLatin1(<const char *>value, valuelen, NULL)
            elif namelen == 5 and memcmp(name, b":path", 5) == 0:
                self._path = PyUnicode_DecodeLatin1(<const char *>value, valuelen, NULL)
            elif namelen == 10 and memcmp(name, b":authority", 10) == 0:
                self._authority = PyUnicode_DecodeLatin1(<const char *>value, valuelen, NULL)
            elif namelen == 7 and memcmp(name, b":status", 7) == 0:
                self._status = _status_code(value, valuelen)
            return 0  # :scheme, :protocol: not needed by anyone downstream
        self._headers.append((_header_name(name, namelen),
                              PyBytes_FromStringAndSize(<const char *>value, valuelen)))
    except BaseException as exc:
        self._error = exc
        return ERR_CALLBACK_FAILURE
    return 0


cdef int _on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame,
                        void *user_data) noexcept:
    cdef Session self = <Session>user_data
    cdef uint8_t kind = frame.hd.type
    cdef int32_t sid = frame.hd.stream_id
    cdef bint end = (frame.hd.flags & F_END_STREAM) != 0
    cdef Event ev
    try:
        if kind == T_DATA:
            if frame.hd.length == 0 and not end:  # an empty DATA frame (a flood's unit)
                self._events.append(_event(_EV_DATA, sid))
            if end:
                self._events.append(_event(_EV_END, sid))
        elif kind == T_HEADERS:
            if frame.headers.cat == CAT_REQUEST or self._status:
                # a request, or a response (the first, or the final one after a 1xx, which
                # nghttp2 files under "other HEADERS" as it does trailers); END_STREAM
                # rides in the event: a GET is one event
                ev = _event(_EV_HEADERS, sid)
                ev.end_stream = end
                ev.headers, self._headers = self._headers, None
                if frame.headers.cat == CAT_REQUEST:
                    ev.method, ev.path, ev.authority = self._method, self._path, self._authority
                else:
                    ev.status = self._status
                self._events.append(ev)
            else:  # trailers (dropped): the body's end is what counts
                self._headers = None
                if end:
                    self._events.append(_event(_EV_END, sid))
        elif kind == T_RST_STREAM:
            ev = _event(_EV_RESET, sid)
            ev.error_code = frame.rst_stream.error_code
            self._events.append(ev)
        elif kind == T_PING:
            if frame.hd.flags & F_ACK:
                ev = _event(_EV_PING_ACK, 0)
                ev.data = PyBytes_FromStringAndSize(<const char *>frame.ping.opaque_data, 8)
                self._events.append(ev)
            else:
                self._events.append(_event(_EV_PING, 0))
        elif kind == T_SETTINGS:
            if not frame.hd.flags & F_ACK:
                self._events.append(_event(_EV_SETTINGS, 0))
        elif kind == T_GOAWAY:
            ev = _event(_EV_GOAWAY, 0)
            ev.last_stream_id = frame.goaway.last_stream_id
            ev.error_code = frame.goaway.error_code
            ev.data = PyBytes_FromStringAndSize(<const char *>frame.goaway.opaque_data,
                                                frame.goaway.opaque_data_len)
            self._events.append(ev)
        elif kind == T_WINDOW_UPDATE:
            self._events.append(_event(_EV_WINDOW_UPDATE, sid))
        elif kind == T_PRIORITY:
            self._events.append(_event(_EV_PRIORITY, sid))
    except BaseException as exc:
        self._error = exc
        return ERR_CALLBACK_FAILURE
    return 0


cdef int _on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t stream_id,
                        const uint8_t *data, size_t length, void *user_data) noexcept:
    cdef Session self = <Session>user_data
    cdef Event ev
    try:
        # keyed by stream id on arrival: a stream reset mid-frame can never leak its
        # chunks into another stream's body
        ev = _event(_EV_DATA, stream_id)
        ev.data = PyBytes_FromStringAndSize(<const char *>data, length)
        ev.flow_len = length
        self._events.append(ev)
        self.data_received += length
    except BaseException as exc:
        self._error = exc
        return ERR_CALLBACK_FAILURE
    return 0


cdef int _on_stream_close(nghttp2_session *s, int32_t stream_id, uint32_t error_code,
                          void *user_data) noexcept:
    cdef Session self = <Session>user_data
    cdef _Outgoing out
    cdef Event ev
    try:
        out = self._out.pop(stream_id, None)
        if out is not None:  # never sent: its producers still get their credit back
            for _, on_flushed in out.items:
                if on_flushed is not None:
                    self._flushed.append(on_flushed)
            out.items.clear()
        ev = _event(_EV_CLOSE, stream_id)
        ev.error_code = error_code
        self._events.append(ev)
    except BaseException as exc:
        self._error = exc
        return ERR_CALLBACK_FAILURE
    return 0


cdef ssize_t _read_body(nghttp2_session *s, int32_t stream_id, uint8_t *buf, size_t length,
                        uint32_t *data_flags, nghttp2_data_source *source,
                        void *user_data) noexcept:
    """Copy queued body bytes into nghttp2's frame buffer (one copy, no Python call)."""
    cdef Session self = <Session>user_data
    cdef _Outgoing out = <_Outgoing>source.ptr
    cdef size_t copied = 0, take, size
    cdef bytes data
    try:
        items = out.items
        while copied < length and items:
            data, on_flushed = items[0]
            size = PyBytes_GET_SIZE(data) - out.offset
            take = size if size <= length - copied else length - copied
            if take:
                memcpy(buf + copied, PyBytes_AS_STRING(data) + out.offset, take)
            copied += take
            if take == size:
                items.popleft()
                out.offset = 0
                if on_flushed is not None:
                    self._flushed.append(on_flushed)
            else:
                out.offset += take
        out.queued -= copied
        if not items and out.eof:
            data_flags[0] |= DATA_FLAG_EOF
            return copied
        if copied == 0:
            out.deferred = True  # resumed by write() / end()
            return ERR_DEFERRED
        return copied
    except BaseException as exc:
        self._error = exc
        return ERR_CALLBACK_FAILURE
