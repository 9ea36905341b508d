"""Watch event boundaries (pure)."""

import struct

from kom_gateway.proxy.watchframes import WatchFrames


def test_json_events_end_with_a_newline():
    frames = WatchFrames(b"application/json")
    assert frames.at_boundary  # nothing yet: nothing cut
    frames.feed(b'{"type":"ADDED","object":{}}\n{"type":"MOD')
    assert not frames.at_boundary
    frames.feed(b'IFIED","object":{}}\n')
    assert frames.at_boundary
    frames.feed(b"")
    assert frames.at_boundary


def test_protobuf_frames_are_length_prefixed_and_may_split_anywhere():
    frames = WatchFrames(b"application/vnd.kubernetes.protobuf;stream=watch")
    stream = b"".join(struct.pack(">I", len(m)) + m for m in (b"x" * 10, b"", b"y" * 300))
    boundaries = {4 + 10, 4 + 10 + 4, len(stream)}
    for cut in range(1, len(stream) + 1):  # every split point, in two chunks
        frames = WatchFrames(b"application/vnd.kubernetes.protobuf;stream=watch")
        frames.feed(stream[:cut])
        assert frames.at_boundary == (cut in boundaries), cut
        frames.feed(stream[cut:])
        assert frames.at_boundary
