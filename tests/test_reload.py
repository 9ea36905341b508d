"""SIGHUP reload of a running `kom-gateway run`: a valid edit takes effect for new
requests; an invalid one is refused with its errors logged, and the last good keeps
serving."""

import signal
import sys
import time
import urllib.request

from e2e import Process, free_port

CONFIG = """
groups:
  default: {{endpoints: ["http://127.0.0.1:{d}"]}}
  pod: {{endpoints: ["http://127.0.0.1:{p}"], resources: [pods]}}
cutover:
  - match: {{userAgent: "kubectl/*"}}
    percent: {{pod: {percent}}}
"""


def group_of(port: int) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/pods",
                                     headers={"User-Agent": "kubectl/v1.31.0"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.headers["X-Kom-Sim-Group"]


def test_sighup_applies_valid_and_refuses_invalid_config(tmp_path):
    d, p = free_port(), free_port()
    config = tmp_path / "gw.yaml"
    config.write_text(CONFIG.format(d=d, p=p, percent=0))
    exe = [sys.executable, "-m", "kom_gateway"]
    sim = Process([*exe, "sim", "--config", str(config), "--control-port", str(free_port())],
                  "kom-gateway sim serving", tmp_path / "sim.log")
    gw = Process([*exe, "run", "--config", str(config), "--listen", "127.0.0.1:0", "--admin",
                  "127.0.0.1:0"], "kom-gateway listening", tmp_path / "gw.log")
    try:
        port = int(gw.log.read_text().split("listening on 127.0.0.1:")[1].split(" ")[0])
        assert group_of(port) == "default"  # pod at 0%

        config.write_text(CONFIG.format(d=d, p=p, percent=100))
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while group_of(port) != "pod":
            assert time.monotonic() < deadline, gw.log.read_text()
            time.sleep(0.1)
        assert "generation 2 applied" in gw.log.read_text()

        config.write_text(CONFIG.format(d=d, p=p, percent=100).replace("pods]", "Pods]"))
        gw.proc.send_signal(signal.SIGHUP)
        while "configuration rejected" not in gw.log.read_text():
            assert time.monotonic() < deadline + 10, gw.log.read_text()
            time.sleep(0.1)
        log = gw.log.read_text()
        assert "still serving generation 2" in log and "bad resource 'Pods'" in log
        assert group_of(port) == "pod"  # the last good config keeps serving
    finally:
        gw.stop()
        sim.stop()
