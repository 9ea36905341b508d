"""`kom-gateway demo`: simulated apiserver groups + the gateway, in one process.

Starts the groups named in config/demo.yaml on their ports, the gateway in front of them,
writes a kubeconfig, and prints which group served what as traffic arrives.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path

from kom_gateway.config import load_config_file
from kom_gateway.config.model import Address
from kom_gateway.proxy.server import RunOptions, run_gateway
from kom_gateway.requestinfo import parse_request
from kom_gateway.sim.auth import SimSecurity
from kom_gateway.sim.server import Simulator, served_key

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


async def run_demo(config_path: str | None = None, kubeconfig_path: str | None = None) -> int:
    """The demo. Its kubeconfig goes to `kubeconfig_path`, else to a directory of its
    own (never a fixed path another demo or a test run would overwrite), and is removed
    when the demo stops."""
    path = config_path or find_demo_config()
    config = load_config_file(path)
    sim = await start_simulator(path, control_port=0)
    started: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
    gateway = asyncio.ensure_future(run_gateway(RunOptions(path), started))
    port, admin_port = await started
    address = Address(config.listen.host, port)
    own_dir: Path | None = None
    if kubeconfig_path:
        kubeconfig = Path(kubeconfig_path)
    else:
        own_dir = Path(tempfile.mkdtemp(prefix="kom-gateway-demo-"))
        kubeconfig = own_dir / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG.format(address=address))
    groups = ", ".join(f"{g.name} :{g.port}" for g in sim.groups.values())
    print(
        f"""
Simulated apiserver groups (one shared store): {groups}
Gateway: http://{address}   metrics: http://{config.admin.host}:{admin_port}/metrics

Try, in another shell:
  export KUBECONFIG={kubeconfig}
  kubectl get pods -A                      # kubectl/* is cut over 100%: lands on 'pod'
  kubectl create configmap demo --from-literal=a=b   # 'config'
  kubectl get deployments                  # unclaimed: 'default'
  curl -s --http2-prior-knowledge http://{address}/api/v1/namespaces/default/events
  curl -s --http2-prior-knowledge -A 'kubelet/v1.31.0' http://{address}/api/v1/pods
                                           # as another program: kubectl cannot change its
                                           # User-Agent, curl -A can
  kom-gateway route --config {path} --user-agent kubelet/v1.31 --client 10.0.0.7 GET /api/v1/pods

Who served what (updates live; Ctrl-C to stop):""",
        flush=True,
    )
    logging.getLogger("kom_gateway.proxy.gateway").setLevel(logging.INFO)  # reloads, in words
    seen = 0  # sequence number of the last request shown
    try:
        while not gateway.done():
            await asyncio.sleep(1.0)
            # in the order they arrived: the last second's requests, counted per kind
            counts: dict[tuple[str, str], int] = {}
            for entry in list(sim.requests):
                if entry["seq"] <= seen or "readyz" in entry["target"]:  # probes: ours
                    continue
                key = (entry["group"], served_key(parse_request(entry["method"], entry["target"])))
                counts[key] = counts.get(key, 0) + 1
            seen = sim.request_count
            for (name, what), count in counts.items():
                total = sim.groups[name].served.get(what, 0)
                print(f"  {name:<8} <- {what}  (+{count}, total {total})", flush=True)
    finally:
        gateway.cancel()
        await sim.close()
        kubeconfig.unlink(missing_ok=True)
        if own_dir is not None:
            own_dir.rmdir()
    return 0
