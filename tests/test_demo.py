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
  - match: {{userAgent: "curl/*"}}
    shadow: {{group: pod, percent: 100}}
"""


def test_demo_runs_and_shows_who_served_what(tmp_path):
    ports = {"gw": free_port(), "admin": free_port(), "d": free_port(), "p": free_port()}
    control = free_port()
    config = tmp_path / "demo.yaml"
    config.write_text(DEMO.format(**ports))
    proc, log = start_demo(tmp_path, "--config", str(config), "--control-port", str(control))
    try:
        deadline = time.monotonic() + 20
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
        # curl's reads are shadowed to pod: the live view counts the matches
        shadowed = urllib.request.Request(f"http://127.0.0.1:{ports['gw']}/api/v1/pods",
                                          headers={"User-Agent": "curl/8.0"})  # fmt: skip
        with urllib.request.urlopen(shadowed, timeout=10) as r:
            assert r.headers["X-Kom-Sim-Group"] == "default"
        while "shadow   pod      match: userAgent=curl/*'s reads" not in log.read_text():
            assert time.monotonic() < deadline + 10, log.read_text()
            time.sleep(0.1)
        # break the pod group as the demo says, and watch the fallback in the live view
        assert f"curl -s -X POST http://127.0.0.1:{control}/groups/pod/down" in text
        post(f"http://127.0.0.1:{control}/groups/pod/down")
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.headers["X-Kom-Sim-Group"] == "default"  # answered all the same
        while "[routed to pod; fell back:" not in log.read_text():
            assert time.monotonic() < deadline + 20, log.read_text()
            time.sleep(0.1)
        assert "default  <- list pods" in log.read_text()
        post(f"http://127.0.0.1:{control}/reset")
        # the access log it writes is there for `plan` and `route --log-line`
        access_log = Path(text.split("kom-gateway plan ")[1].split()[0])
        assert access_log.parent == kubeconfig.parent
        plan = subprocess.run([sys.executable, "-m", "kom_gateway", "plan", str(access_log)],
                              capture_output=True, text=True, timeout=30)
        assert plan.returncode == 0 and "kubectl" in plan.stdout, plan.stdout + plan.stderr
        # an edit while it runs: the live view shows what changed, in words
        config.write_text(DEMO.format(**ports).replace("{pod: 100}", "{pod: 50}"))
        while "generation 2 applied" not in log.read_text():
            assert time.monotonic() < deadline + 30, log.read_text()
            time.sleep(0.2)
        assert "pod 100% -> 50%" in log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    assert not kubeconfig.parent.exists()  # what it wrote is gone with it


def start_demo(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """`kom-gateway demo ARGS`, once it has printed its instructions (output in a file)."""
    log = tmp_path / "demo.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kom_gateway", "demo", *args],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 20
    while "Who answered what" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            raise AssertionError(log.read_text())
        time.sleep(0.1)
    return proc, log


def post(url: str) -> None:
    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=10):
        pass


def test_demo_ports_move_with_port_offset(tmp_path):
    """Something else on 8443: `--port-offset N` moves all of the demo's ports."""
    base = {"gw": free_port(), "admin": free_port(), "d": free_port(), "p": free_port()}
    offset = 7
    config = tmp_path / "demo.yaml"
    config.write_text(DEMO.format(**{k: v - offset for k, v in base.items()}))
    proc, log = start_demo(tmp_path, "--config", str(config), "--port-offset", str(offset),
                           "--control-port", str(free_port()))  # fmt: skip
    try:
        text = log.read_text()
        assert f"http://127.0.0.1:{base['gw']}" in text and f":{base['p']}" in text
        request = urllib.request.Request(f"http://127.0.0.1:{base['gw']}/api/v1/pods",
                                         headers={"User-Agent": "kubectl/v1.31.0"})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.headers["X-Kom-Sim-Group"] == "pod"
        assert config.read_text() == DEMO.format(**{k: v - offset for k, v in base.items()})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
