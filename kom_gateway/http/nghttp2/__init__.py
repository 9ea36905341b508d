"""The fast HTTP/2 engine, on libnghttp2 through a Cython binding (`_nghttp2.pyx`)."""
