"""Coverage-guided fuzzing of the nghttp2 binding (kom_gateway/http/nghttp2/_nghttp2.pyx), server
and client side, with atheris (libFuzzer for Python and native code).

    python bench/fuzz_engine.py --seconds 60          # exit 0: nothing crashed
    python bench/fuzz_engine.py --seconds 3600 --asan # long run under AddressSanitizer
    python bench/fuzz_engine.py --reproduce CRASH_FILE   # one input, the installed build

Each input drives one session as a peer would, and the gateway's side as the protocol
classes do: the first byte picks the side and how the input is cut into reads; the reads
(after a valid preface, so the fuzzer starts past it) are fed to `receive()`, and bytes
the fuzzer chooses between them call the rest of the binding's surface with fuzzed
arguments (respond, request, write with on_flushed callbacks, end, reset, consume, ping,
goaway, shutdown notice, close, then every call again on the closed session). A crash
is a segfault or a sanitizer report, an exception other than `SessionError` (nghttp2
ending the connection is an answer, not a bug) or a broken invariant: every event is an
`Event` of the vocabulary's kinds, every on_flushed callback runs exactly once by the
time the session is freed (producers get their credit back), nothing runs after close.

The binding is rebuilt for the run with clang's `-fsanitize=fuzzer-no-link` (native edge
coverage for libFuzzer) and, with `--asan`, AddressSanitizer (the process is re-executed
with atheris' ASan runtime preloaded and PYTHONMALLOC=malloc, so Python objects'
memory is checked too). Without clang (Debian `clang-14`), the installed build is fuzzed
with coverage of the Python side only. Crash inputs are written to --artifacts (default:
a temporary directory, printed). Needs `atheris` (PyPI).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYX = ROOT / "kom_gateway" / "http" / "nghttp2" / "_nghttp2.pyx"
MODULE = "kom_gateway.http.nghttp2._nghttp2"
BUILD_ENV = "KOM_FUZZ_BINDING"  # path of the instrumented build, for the re-executed run
CLANGS = ("clang", "clang-19", "clang-16", "clang-15", "clang-14")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


def build(asan: bool, out_dir: Path) -> Path | None:
    """The binding compiled with coverage instrumentation (and ASan); None if no clang."""
    clang = next((c for c in CLANGS if shutil.which(c)), None)
    if clang is None:
        return None
    from Cython.Build import cythonize  # (the build's own dependency)

    work = out_dir / "src"
    work.mkdir(parents=True, exist_ok=True)
    pyx = work / "_nghttp2.pyx"
    shutil.copy(PYX, pyx)
    cythonize([str(pyx)], quiet=True, compiler_directives={"language_level": "3"})
    target = out_dir / ("_nghttp2" + sysconfig.get_config_var("EXT_SUFFIX"))
    sanitizers = "fuzzer-no-link,address" if asan else "fuzzer-no-link,undefined"
    subprocess.run(
        [clang, "-shared", "-fPIC", "-g", "-O1", f"-fsanitize={sanitizers}",
         f"-I{sysconfig.get_paths()['include']}", str(work / "_nghttp2.c"),
         "-l:libnghttp2.so.14", "-o", str(target)],
        check=True,
    )  # fmt: skip
    return target


def load_binding(path: Path | None) -> object:
    """Import the binding: the instrumented build at `path`, or the installed one."""
    if path is not None:
        spec = importlib.util.spec_from_file_location(MODULE, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[MODULE] = module
        spec.loader.exec_module(module)
        return module
    from kom_gateway.http.nghttp2 import _nghttp2

    return _nghttp2


class Reader:
    """The input as a script: op bytes, small integers, byte strings (a plain layout, so
    seeds are easy to write and libFuzzer's mutations stay meaningful); zeros once it
    runs out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1] if self.pos <= len(self.data) else 0

    def int16(self) -> int:
        return self.byte() | self.byte() << 8

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


class Harness:
    """One fuzz input against one fresh session."""

    def __init__(self, ng: object) -> None:
        self.ng = ng
        from kom_gateway.http import events

        self.kinds = set(events.NAMES)

    def run(self, data: bytes) -> None:
        ng = self.ng
        r = Reader(data)
        server = bool(r.byte() & 1)
        session = ng.Session(server, 64 + r.int16())  # type: ignore[attr-defined]
        session.submit_settings([(ng.SETTINGS_MAX_CONCURRENT_STREAMS, 100)])  # type: ignore[attr-defined]
        pending: dict[int, int] = {}  # on_flushed callbacks not yet run, by id
        ran: list[int] = []

        def on_flushed(token: int) -> object:
            pending[token] = 1

            def done() -> None:
                if token not in pending:
                    raise AssertionError(f"on_flushed {token} ran twice")
                del pending[token]
                ran.append(token)

            return done

        try:
            if server:
                self.feed(session, PREFACE + EMPTY_SETTINGS)
            else:
                session.request([(b":method", b"GET"), (b":scheme", b"https"),
                                 (b":authority", b"a"), (b":path", b"/")], False)  # fmt: skip
                session.send()
                self.feed(session, EMPTY_SETTINGS + SETTINGS_ACK)
            token = 0
            while r.remaining() > 0:
                op = r.byte() % 16
                sid = r.byte() % 10
                if op < 6:  # a read from the peer, of a fuzzed length
                    self.feed(session, r.take(r.int16()))
                elif op == 6:
                    headers = [(b":status", b"200")] if server else [
                        (b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"a"),
                        (b":path", b"/api/v1/pods")]  # fmt: skip
                    headers.append((r.take(8).lower() or b"x", r.take(16)))
                    if server:
                        session.respond(sid, headers, bool(r.byte() & 1))
                    else:
                        session.request(headers, bool(r.byte() & 1))
                elif op == 7:
                    token += 1
                    size = r.int16() * 2
                    if not session.write(sid, b"d" * size, on_flushed(token)):
                        pending.pop(token)  # refused: the caller keeps its credit
                elif op == 8:
                    session.end(sid)
                elif op == 9:
                    session.reset(sid, r.byte() % 16)
                elif op == 10:
                    session.consume(sid, r.int16() * 16)
                elif op == 11:
                    session.ping(r.take(8))
                elif op == 12:
                    session.goaway(sid, r.byte() % 16, r.take(8))
                elif op == 13:
                    session.shutdown_notice()
                elif op == 14:
                    self.drain(session)
                else:
                    break  # the connection drops here
                session.queued(sid)
                session.want_io()
                session.receive_window()
        except ng.SessionError:  # type: ignore[attr-defined]
            pass  # nghttp2 ended the connection: an answer, not a crash
        self.check_events(session.take_events())
        session.close()
        session.run_flushed()
        if pending:
            raise AssertionError(f"on_flushed callbacks never ran: {sorted(pending)}")
        # every call on a freed session is harmless
        assert session.closed and session.send() == b"" and session.receive(b"x") == []
        session.reset(1, 0)
        session.consume(1, 10)
        assert not session.write(1, b"y", None) and not session.end(1)

    def feed(self, session: object, data: bytes) -> None:
        self.check_events(session.receive(data))  # type: ignore[attr-defined]
        self.drain(session)

    def drain(self, session: object) -> None:
        session.send()  # type: ignore[attr-defined]
        self.check_events(session.take_events())  # type: ignore[attr-defined]
        session.run_flushed()  # type: ignore[attr-defined]

    def check_events(self, events: list) -> None:
        for event in events:
            if type(event) is not self.ng.Event or event.kind not in self.kinds:  # type: ignore[attr-defined]
                raise AssertionError(f"not an engine event: {event!r}")
            if event.headers is not None:
                assert all(type(n) is bytes and type(v) is bytes for n, v in event.headers)
            assert type(event.data) is bytes and event.flow_len >= 0


def seeds(corpus: Path) -> None:
    """Start from real conversations: requests, bodies, resets, pings, GOAWAY."""
    import h2.config
    import h2.connection

    corpus.mkdir(parents=True, exist_ok=True)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.data_to_send()
    req = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"gw"),
           (b":path", b"/api/v1/namespaces/default/pods"), (b"user-agent", b"k/1")]  # fmt: skip
    client.send_headers(1, req)
    client.send_data(1, b"{}" * 100, end_stream=True)
    client.send_headers(3, req, end_stream=True)
    client.reset_stream(3, 8)
    client.ping(b"12345678")
    client.close_connection()
    frames = client.data_to_send()
    # side byte 1 (server), header limit, then op 0 (a read) on stream 1 of the frames
    (corpus / "server-conversation").write_bytes(
        b"\x01\xff\xff" + bytes([0, 1]) + len(frames).to_bytes(2, "little") + frames
    )
    # the client side: an apiserver's answer to the harness' request on stream 1
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer.initiate_connection()
    peer.send_headers(1, req)
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    server.receive_data(peer.data_to_send())
    server.data_to_send()
    server.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/json")])
    server.send_data(1, b"{}" * 100)
    server.send_headers(1, [(b"x-trailer", b"1")], end_stream=True)
    server.close_connection()
    frames = server.data_to_send()
    (corpus / "client-conversation").write_bytes(
        b"\x00\xff\xff" + bytes([0, 1]) + len(frames).to_bytes(2, "little") + frames
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--asan", action="store_true", help="build and run under ASan")
    parser.add_argument("--artifacts", type=Path, help="where crash inputs go")
    parser.add_argument("--corpus", type=Path, help="a corpus directory to grow")
    parser.add_argument("--reproduce", type=Path, help="run one input (no libFuzzer) and exit")
    args = parser.parse_args()
    built = os.environ.get(BUILD_ENV)
    if args.reproduce is not None and built is None:  # the installed build, no libFuzzer
        Harness(load_binding(None)).run(args.reproduce.read_bytes())
        print(f"fuzz_engine: {args.reproduce.name}: no crash")
        return 0
    if built is None:  # first stage: build the instrumented binding, then run
        out = Path(tempfile.mkdtemp(prefix="kom-fuzz-"))
        path = build(args.asan, out)
        if path is None:
            print("fuzz_engine: no clang; fuzzing the installed build (Python coverage only)")
            if args.asan:
                print("fuzz_engine: --asan needs clang (Debian clang-14)", file=sys.stderr)
                return 2
        env = dict(os.environ, **{BUILD_ENV: str(path or "")})
        if path is not None:  # the instrumented build needs libFuzzer's runtime loaded first
            import atheris

            runtime = "asan_with_fuzzer.so" if args.asan else "ubsan_with_fuzzer.so"
            env["LD_PRELOAD"] = str(Path(atheris.path()) / runtime)
        if args.asan:
            env["PYTHONMALLOC"] = "malloc"
            env.setdefault("ASAN_OPTIONS", "detect_leaks=0:allocator_may_return_null=1")
        try:
            return subprocess.run([sys.executable, *sys.argv], env=env).returncode
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return fuzz(args, Path(built) if built else None)


def fuzz(args: argparse.Namespace, built: Path | None) -> int:
    import atheris

    with atheris.instrument_imports(include=["kom_gateway"]):
        ng = load_binding(built)
        harness = Harness(ng)
    corpus = args.corpus or Path(tempfile.mkdtemp(prefix="kom-fuzz-corpus-"))
    seeds(corpus)
    artifacts = args.artifacts or Path(tempfile.mkdtemp(prefix="kom-fuzz-crashes-"))
    artifacts.mkdir(parents=True, exist_ok=True)
    print(f"fuzz_engine: corpus {corpus}, crash inputs go to {artifacts}", flush=True)
    libfuzzer_args = [
        sys.argv[0],
        f"-max_total_time={args.seconds}",
        f"-artifact_prefix={artifacts}/",
        "-max_len=16384",
        "-print_final_stats=1",
        str(corpus),
    ]
    atheris.Setup(libfuzzer_args, harness.run)
    atheris.Fuzz()  # exits the process: 0 when the time ran out without a crash
    return 0


if __name__ == "__main__":
    sys.exit(main())
