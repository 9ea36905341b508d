"""The extension declares the slice of libnghttp2's ABI it uses itself (so it builds
where only the runtime library is installed). Here those declarations are compiled side
by side with the real <nghttp2/nghttp2.h>, and every layout and constant must agree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

PYX = Path(__file__).parent.parent / "kom_gateway/http/nghttp2/_nghttp2.pyx"
HEADER = Path("/usr/include/nghttp2/nghttp2.h")

PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#define OFF(t, f) printf(#t "." #f " %zu\n", offsetof(t, f))
int main(void) {
  OFF(nghttp2_nv, name); OFF(nghttp2_nv, value); OFF(nghttp2_nv, namelen);
  OFF(nghttp2_nv, valuelen); OFF(nghttp2_nv, flags); printf("nv %zu\n", sizeof(nghttp2_nv));
  OFF(nghttp2_frame_hd, length); OFF(nghttp2_frame_hd, stream_id);
  OFF(nghttp2_frame_hd, type); OFF(nghttp2_frame_hd, flags);
  OFF(nghttp2_headers, cat); OFF(nghttp2_rst_stream, error_code);
  OFF(nghttp2_ping, opaque_data); OFF(nghttp2_goaway, last_stream_id);
  OFF(nghttp2_goaway, error_code); OFF(nghttp2_goaway, opaque_data);
  OFF(nghttp2_goaway, opaque_data_len); OFF(nghttp2_settings_entry, value);
  printf("settings_entry %zu\n", sizeof(nghttp2_settings_entry));
  OFF(nghttp2_data_provider, read_callback);
  printf("data_provider %zu\n", sizeof(nghttp2_data_provider));
  printf("headers.cat size %zu\n", sizeof(((nghttp2_headers *)0)->cat));
  return 0;
}
"""
CONSTANTS = {  # name in the header -> the value the .pyx uses
    "NGHTTP2_ERR_DEFERRED": -508, "NGHTTP2_ERR_CALLBACK_FAILURE": -902,
    "NGHTTP2_ERR_FLOODED": -904, "NGHTTP2_ERR_TOO_MANY_CONTINUATIONS": -905,
    "NGHTTP2_DATA_FLAG_EOF": 1, "NGHTTP2_NV_FLAG_NO_INDEX": 1, "NGHTTP2_HCAT_REQUEST": 0,
    "NGHTTP2_HCAT_RESPONSE": 1, "NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS": 3,
    "NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE": 4, "NGHTTP2_SETTINGS_MAX_FRAME_SIZE": 5,
    "NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE": 6, "NGHTTP2_SETTINGS_ENABLE_PUSH": 2,
}


def _needs_header() -> None:
    if not HEADER.exists() or shutil.which("cc") is None:
        if os.environ.get("KOM_REQUIRE_CLIENTS"):
            pytest.fail("needs <nghttp2/nghttp2.h> (Debian libnghttp2-dev) and a C compiler")
        pytest.skip("needs <nghttp2/nghttp2.h> (Debian libnghttp2-dev) and a C compiler")


def _run(tmp_path: Path, prelude: str, name: str) -> str:
    source = tmp_path / f"{name}.c"
    source.write_text(prelude + PROBE)
    exe = tmp_path / name
    subprocess.run(["cc", "-o", str(exe), str(source)], check=True, capture_output=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


def test_our_declarations_match_the_real_header(tmp_path):
    _needs_header()
    ours = re.search(r'cdef extern from \*:\n    """\n(.*?)\n    """', PYX.read_text(), re.S)
    assert ours is not None
    assert _run(tmp_path, ours.group(1), "ours") == _run(
        tmp_path, "#include <nghttp2/nghttp2.h>\n", "real"
    )


def test_constants_match_the_real_header(tmp_path):
    _needs_header()
    probe = "#include <stdio.h>\n#include <nghttp2/nghttp2.h>\nint main(void){\n"
    probe += "".join(f'printf("{n} %d\\n", (int){n});\n' for n in CONSTANTS) + "return 0;}\n"
    source = tmp_path / "constants.c"
    source.write_text(probe)
    subprocess.run(["cc", "-o", str(tmp_path / "c"), str(source)], check=True)
    out = subprocess.run([str(tmp_path / "c")], check=True, capture_output=True, text=True).stdout
    assert dict(line.split() for line in out.splitlines()) == {k: str(v) for k, v in CONSTANTS.items()}
