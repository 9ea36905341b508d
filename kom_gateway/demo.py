"""`kom-gateway demo`: simulated apiserver groups + the gateway, in one process.

Starts the groups named in config/demo.yaml on their ports, the simulator's control API
(to break a group and watch the fallback), the gateway in front of them with an access
log of its own, writes a kubeconfig, and prints which group answered what as traffic
arrives (from that access log: where each request was routed, who answered, and why,
fallbacks included). `--port-offset N` moves every port by N (through a copy of the
config in the demo's own directory); everything it writes is removed when it stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml
from prometheus_client.parser import text_string_to_metric_families

from kom_gateway.config import load_config_file
from kom_gateway.config.model import Address
from kom_gateway.server.run import RunOptions, run_gateway
from kom_gateway.sim.auth import SimSecurity
from kom_gateway.sim.faults import CONTROL_PORT
from kom_gateway.sim.server import Simulator

KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- name: kom-demo
  cluster: {{server: "http://{address}"}}
users:
- name: demo
  user: {{token: demo-token}}
contexts:
- name: kom-demo
  context: {{cluster: kom-demo, user: demo, namespace: default}}
current-context: kom-demo
"""


def find_demo_config() -> str:
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = base / "config" / "demo.yaml"
        if candidate.is_file():
            return str(candidate)
    raise SystemExit("config/demo.yaml not found: run the demo from the kom-gateway checkout")


async def start_simulator(
    config_path: str,
    control_port: int,
    bookmark_interval: float = 5.0,
    security: SimSecurity | None = None,
) -> Simulator:
    """Simulated groups on the ports of the config's endpoints: https:// ones when
    `security` names a serving certificate, http:// (h2c) ones otherwise."""
    config = load_config_file(config_path)
    security = security or SimSecurity()
    ssl_context = security.ssl_context()
    scheme = "https" if ssl_context is not None else "http"
    sim = Simulator(
        bookmark_interval=bookmark_interval,
        ssl_context=ssl_context,
        authenticator=security.authenticator(),
    )
    for group in config.groups.values():
        for i, endpoint in enumerate(group.endpoints):
            if endpoint.scheme != scheme:
                raise SystemExit(
                    f"{endpoint}: the simulator serves {scheme}:// here"
                    + (" (give it --tls-cert-file for https)" if scheme == "http" else "")
                )
            name = group.name if i == 0 else f"{group.name}-{i}"
            await sim.add_group(name, endpoint.host, endpoint.port)
    if control_port:
        await sim.start_control("127.0.0.1", control_port)
    return sim


def moved_config(path: str, offset: int, out_dir: Path) -> str:
    """A copy of the config at `path` with every port (listen, admin, endpoints) moved by
    `offset`, written to `out_dir`; its relative file paths still resolve."""
    data: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {}

    def moved(address: str) -> str:
        host, _, port = address.rpartition(":")
        return f"{host}:{int(port) + offset}"

    for section in ("listen", "admin"):
        if isinstance(data.get(section), dict) and "address" in data[section]:
            data[section]["address"] = moved(str(data[section]["address"]))
    for group in (data.get("groups") or {}).values():
        urls = []
        for url in group.get("endpoints", []):
            parts = urlsplit(url)
            urls.append(urlunsplit(parts._replace(netloc=moved(parts.netloc))))
        group["endpoints"] = urls
    copy = out_dir / Path(path).name
    copy.write_text(f"# {path}, every port moved by {offset} (kom-gateway demo)\n"
                    + yaml.safe_dump(data, sort_keys=False))  # fmt: skip
    return str(copy)


class LiveView:
    """The demo's running account, from the gateway's access log: per second, what each
    group answered, and where a request was routed but answered elsewhere (fallback)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.totals: dict[tuple[str, str, str], int] = {}

    def lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        counts: dict[tuple[str, str, str], int] = {}
        for raw in complete.splitlines():
            try:
                r = json.loads(raw)
            except ValueError:
                continue
            sub = f"/{r['subresource']}" if r["subresource"] else ""
            what = r["path"] or r["resource"] + sub
            routed = ""
            if r["fallback"]:
                routed = f"  [routed to {r['chosenGroup']}; fell back: {r['fallback']}]"
            elif r["answeredBy"] == "gateway":
                routed = f"  [{r['status']} from the gateway]"
            key = (r["answeredBy"], f"{r['verb']} {what}", routed)
            counts[key] = counts.get(key, 0) + 1
        out = []
        for key, count in counts.items():
            total = self.totals[key] = self.totals.get(key, 0) + count
            answered, what, routed = key
            out.append(f"  {answered:<8} <- {what}  (+{count}, total {total}){routed}")
        return out


class ShadowView:
    """The demo's account of shadow reads, from the gateway's /metrics: what each
    candidate group's answers came to since the last look."""

    def __init__(self, metrics_url: str) -> None:
        self.url = metrics_url
        self.seen: dict[tuple[str, str, str, str], float] = {}

    def lines(self) -> list[str]:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return []
        return self.news(text)

    def news(self, text: str) -> list[str]:
        out = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name != "kom_gateway_shadow_requests_total":
                    continue
                labels = sample.labels
                key = (labels["rule"], labels["group"], labels["result"], labels["reason"])
                new = sample.value - self.seen.get(key, 0.0)
                self.seen[key] = sample.value
                if new > 0:
                    rule, group, result, reason = key
                    why = f" ({reason})" if reason else ""
                    out.append(
                        f"  shadow   {group:<8} {result}{why}: {rule}'s reads on default, also "
                        f"asked of {group}  (+{new:.0f}, total {sample.value:.0f})"
                    )
        return out


async def run_demo(
    config_path: str | None = None,
    kubeconfig_path: str | None = None,
    port_offset: int = 0,
    control_port: int | None = None,
) -> int:
    """The demo. What it writes (kubeconfig, access log, a moved config) goes to a
    directory of its own (never a fixed path another demo or a test run would
    overwrite; the kubeconfig to `kubeconfig_path` if given), removed when it stops."""
    own_dir = Path(tempfile.mkdtemp(prefix="kom-gateway-demo-"))
    try:
        control = CONTROL_PORT + port_offset if control_port is None else control_port
        return await _demo(config_path, kubeconfig_path, port_offset, control, own_dir)
    finally:
        shutil.rmtree(own_dir, ignore_errors=True)


async def _demo(
    config_path: str | None,
    kubeconfig_path: str | None,
    port_offset: int,
    control_port: int,
    own_dir: Path,
) -> int:
    path = config_path or find_demo_config()
    if port_offset:
        path = moved_config(path, port_offset, own_dir)
    config = load_config_file(path)
    sim = await start_simulator(path, control_port=control_port)
    access_log = own_dir / "access.log"
    started: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
    gateway = asyncio.ensure_future(
        run_gateway(RunOptions(path, access_log=str(access_log)), started)
    )
    port, admin_port = await started
    address = Address(config.listen.host, port)
    kubeconfig = Path(kubeconfig_path) if kubeconfig_path else own_dir / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG.format(address=address))
    groups = ", ".join(f"{g.name} :{g.port}" for g in sim.groups.values())
    control = f"http://127.0.0.1:{control_port}"
    print(
        f"""
Simulated apiserver groups (one shared store): {groups}
Gateway: http://{address}   metrics: http://{config.admin.host}:{admin_port}/metrics
Config: {path} (edit it while the demo runs: the reload is logged below, in words)

Try, in another shell:
  export KUBECONFIG={kubeconfig}
  kubectl get pods -A                      # kubectl/* is cut over 100%: lands on 'pod'
  kubectl create configmap demo --from-literal=a=b   # 'config'
  kubectl get deployments                  # unclaimed: 'default'
  curl -s --http2-prior-knowledge http://{address}/api/v1/namespaces/default/events
  curl -s --http2-prior-knowledge -A 'kubelet/v1.31.0' http://{address}/api/v1/pods
                                           # as another program: kubectl cannot change its
                                           # User-Agent, curl -A can

Prove a group before anyone moves: curl's rule shadows its pod reads to 'pod' (compared
at the same resourceVersion; curl only ever gets default's answer):
  curl -s --http2-prior-knowledge http://{address}/api/v1/pods -o /dev/null   # shadow: match
  curl -s -X PUT -d '{{"diverge": "content"}}' {control}/groups/pod/faults   # pod diverges
  kubectl run demo --image=x                 # (a pod, so the lists have content)
  curl -s --http2-prior-knowledge http://{address}/api/v1/pods -o /dev/null   # mismatch

Break a group and watch the fallback (the simulator's control API, {control}):
  curl -s -X POST {control}/groups/pod/down     # pod's apiserver goes away
  kubectl get pods                              # still answered, by default
  curl -s -X POST {control}/groups/pod/up       # and back
  curl -s -X PUT -d '{{"status_override": 500}}' {control}/groups/config/faults
  curl -s -X POST {control}/reset               # every fault off
  curl -s {control}/groups                      # each group's faults and counters

Every request is in the access log: {access_log}
  kom-gateway plan {access_log}         # what a cut-over would move
  kom-gateway route --config {path} --log-line "$(tail -1 {access_log})"

Who answered what (updates live; Ctrl-C to stop):""",
        flush=True,
    )
    logging.getLogger("kom_gateway.proxy.gateway").setLevel(logging.INFO)  # reloads, in words
    view = LiveView(access_log)
    shadows = ShadowView(f"http://{config.admin.host}:{admin_port}/metrics")
    try:
        while not gateway.done():
            await asyncio.sleep(1.0)
            for line in view.lines() + await asyncio.to_thread(shadows.lines):
                print(line, flush=True)
    finally:
        gateway.cancel()
        await sim.close()
        if kubeconfig_path:
            kubeconfig.unlink(missing_ok=True)
    return 0
