"""Live reload of a running `kom-gateway run`, on SIGHUP and when the file changes
(including a ConfigMap volume's symlink swap): a valid edit takes effect for new
requests and is logged in words; an invalid one is refused with its errors logged, and
the last good keeps serving; no request fails meanwhile."""

import signal
import sys
import threading
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


def swap_configmap(directory, text: str, version: int) -> None:
    """Update a ConfigMap volume as the kubelet does: write a new timestamped directory,
    then atomically repoint the `..data` symlink at it."""
    new = directory / f"..2026_11_22_{version:02d}"
    new.mkdir()
    (new / "gw.yaml").write_text(text)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(new.name)
    tmp.replace(directory / "..data")


def test_file_watch_reloads_configmap_swaps_under_live_traffic(tmp_path):
    d, p = free_port(), free_port()
    volume = tmp_path / "volume"
    volume.mkdir()
    swap_configmap(volume, CONFIG.format(d=d, p=p, percent=0), 1)
    config = volume / "gw.yaml"
    config.symlink_to("..data/gw.yaml")  # what the pod sees: a symlink through ..data
    exe = [sys.executable, "-m", "kom_gateway"]
    sim = Process([*exe, "sim", "--config", str(config), "--control-port", str(free_port())],
                  "kom-gateway sim serving", tmp_path / "sim.log")
    gw = Process([*exe, "run", "--config", str(config), "--listen", "127.0.0.1:0", "--admin",
                  "127.0.0.1:0", "--watch-interval", "0.2"],
                 "kom-gateway listening", tmp_path / "gw.log")
    seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()
    try:
        port = int(gw.log.read_text().split("listening on 127.0.0.1:")[1].split(" ")[0])

        def traffic() -> None:
            while not stop.is_set():
                try:
                    seen.append(group_of(port))
                except Exception as exc:  # any failed request fails the test
                    failures.append(repr(exc))

        thread = threading.Thread(target=traffic)
        thread.start()

        def wait_for(text: str) -> None:
            deadline = time.monotonic() + 10
            while text not in gw.log.read_text():
                assert time.monotonic() < deadline, gw.log.read_text()
                time.sleep(0.05)

        time.sleep(0.5)
        swap_configmap(volume, CONFIG.format(d=d, p=p, percent=100), 2)
        wait_for("generation 2 applied")
        log = gw.log.read_text()
        assert "changed on disk: reloading" in log
        assert "cutover userAgent=kubectl/*: pod 0% -> 100%" in log  # what changed, in words
        time.sleep(0.5)
        assert seen[-1] == "pod"

        swap_configmap(volume, "groups: {default: {endpoints: [nope]}}\n", 3)  # invalid
        wait_for("configuration rejected")
        time.sleep(0.5)
        assert "still serving generation 2" in gw.log.read_text()
        assert seen[-1] == "pod"  # the last good config keeps serving
        assert gw.log.read_text().count("configuration rejected") == 1  # reported once

        config.unlink()  # an edit in place of a plain file works the same way
        config.write_text(CONFIG.format(d=d, p=p, percent=0))
        wait_for("generation 3 applied")
        time.sleep(0.5)
        assert seen[-1] == "default"

        config.write_text(CONFIG.format(d=d, p=p, percent=100))
        gw.proc.send_signal(signal.SIGHUP)  # SIGHUP right after an edit the watcher also sees
        wait_for("generation 4 applied")
        time.sleep(1)
        # the change is applied once: the watcher does not apply the same edit again (a
        # watcher check that beat the signal leaves SIGHUP a reload with "no changes")
        assert gw.log.read_text().count("cutover userAgent=kubectl/*: pod 0% -> 100%") == 2
        assert "generation 6" not in gw.log.read_text()
        stop.set()
        thread.join()
        assert seen[-1] == "pod"
        assert not failures, failures[:3]  # no request failed across four reloads
        assert seen.count("pod") > 5 and seen.count("default") > 5
    finally:
        stop.set()
        gw.stop()
        sim.stop()


async def test_reload_parses_off_the_event_loop_and_refuses_oversized_files(tmp_path):
    """Requests keep being answered while a large config is parsed and validated, and
    a file over the size limit is refused unread; the last good config keeps serving."""
    import asyncio

    from harness import FAST_HEALTH, Stack, config_text

    from kom_gateway.config.loader import MAX_CONFIG_BYTES

    stack = await Stack().start()
    try:
        client = await stack.client()
        ports = {n: g.port for n, g in stack.sim.groups.items()}
        rules = "".join(f'  - match: {{userAgent: "agent-{i}/*"}}\n    percent: {{pod: 50}}\n'
                        for i in range(8000))
        big = tmp_path / "big.yaml"
        big.write_text(config_text(ports, "cutover:\n" + rules, FAST_HEALTH))
        reload = asyncio.ensure_future(stack.gateway.reload(str(big)))
        answered = 0
        while not reload.done():
            assert (await client.request("GET", "/api/v1/nodes")).status == 200
            answered += 1
        assert (await reload).applied and stack.gateway.holder.current.generation == 2
        assert answered >= 3  # served while the file was being parsed
        m = stack.gateway.metrics
        assert m.config_last_reload_successful._value.get() == 1
        assert m.cutover_percent.labels("userAgent=agent-7/*", "pod")._value.get() == 50

        huge = tmp_path / "huge.yaml"
        huge.write_text(big.read_text() + "#" * MAX_CONFIG_BYTES)
        result = await stack.gateway.reload(str(huge))
        assert not result.applied and "larger than the limit" in result.error.render()
        assert stack.gateway.holder.current.generation == 2
        assert m.config_last_reload_successful._value.get() == 0  # as Prometheus tells it
    finally:
        await stack.close()
