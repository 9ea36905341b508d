"""`kom-gateway demo` (the README's run command) starts, serves kubectl-style traffic
to the right groups, and reports who served what."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from e2e import free_port

DEMO = """
listen: {{address: "127.0.0.1:{gw}"}}
admin: {{address: "127.0.0.1:{admin}"}}
groups:
  default: {{endpoints: ["http://127.0.0.1:{d}"]}}
  pod: {{endpoints: ["http://127.0.0.1:{p}"], resources: [pods]}}
cutover:
  - match: {{userAgent: "kubectl/*"}}
    percent: {{pod: 100}}
"""


def test_demo_runs_and_shows_who_served_what(tmp_path):
    ports = {"gw": free_port(), "admin": free_port(), "d": free_port(), "p": free_port()}
    config = tmp_path / "demo.yaml"
    config.write_text(DEMO.format(**ports))
    log = tmp_path / "demo.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kom_gateway", "demo", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while "Who served what" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        text = log.read_text()
        assert "export KUBECONFIG=" in text and f"http://127.0.0.1:{ports['gw']}" in text
        kubeconfig = Path(text.split("export KUBECONFIG=")[1].split()[0])
        assert kubeconfig.is_file() and kubeconfig.parent.name.startswith("kom-gateway-demo-")
        request = urllib.request.Request(f"http://127.0.0.1:{ports['gw']}/api/v1/pods",
                                         headers={"User-Agent": "kubectl/v1.31.0"})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.headers["X-Kom-Sim-Group"] == "pod"
        while "pod      <- list pods" not in log.read_text():
            assert time.monotonic() < deadline + 10, log.read_text()
            time.sleep(0.1)
        # an edit while it runs: the live view shows what changed, in words
        config.write_text(DEMO.format(**ports).replace("{pod: 100}", "{pod: 50}"))
        while "generation 2 applied" not in log.read_text():
            assert time.monotonic() < deadline + 30, log.read_text()
            time.sleep(0.2)
        assert "pod 100% -> 50%" in log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    assert not kubeconfig.exists()  # what it wrote is gone with it
