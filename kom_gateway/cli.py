"""`kom-gateway` command line: run, check a routing config, predict a routing decision,
plan and drive a cut-over."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Coroutine, Sequence
from typing import Any

from kom_gateway import __version__
from kom_gateway.config import Config, ConfigError, load_or_report
from kom_gateway.config.model import Address
from kom_gateway.config.tlscheck import MISSING_FILE, tls_problems, tls_warnings
from kom_gateway.http.settings import HTTP2_ENGINES
from kom_gateway.rollout import command as rollout_command
from kom_gateway.routing import DEFAULT_GROUP
from kom_gateway.routing import command as route_command
from kom_gateway.routing.cutover import format_percent
from kom_gateway.server.bind import BindError
from kom_gateway.sim.faults import CONTROL_PORT, control_api_help


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # the reader went away (`kom-gateway route ... | head -1`): as any Unix tool, stop
        # quietly. stdout points at nothing now, so the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kom-gateway",
        description="Route Kubernetes API traffic by resource to groups of kube-apiservers.",
    )
    parser.add_argument("--version", action="version", version=f"kom-gateway {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    check = sub.add_parser(
        "check",
        help="validate a routing config and print what it does",
        description="Validate CONFIG as the gateway would load it (every error with its YAML "
        "path and line, warnings too) and print its groups, claims and cut-over rules. "
        "Exit 1 if it would be refused.",
    )
    check.add_argument(
        "--no-files",
        action="store_true",
        help="do not open the TLS files it names (a config meant for another machine)",
    )
    check.add_argument("config", metavar="CONFIG")
    check.set_defaults(func=cmd_check)

    route_command.add_parser(sub)

    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("--config", required=True, metavar="CONFIG")
    run.add_argument("--listen", metavar="HOST:PORT", help="override listen.address (port 0: any)")
    run.add_argument("--admin", metavar="HOST:PORT", help="override admin.address (port 0: any)")
    run.add_argument(
        "--drain-seconds",
        type=float,
        default=5.0,
        help="on SIGTERM, how long requests in flight may take (default 5)",
    )
    run.add_argument(
        "--watch-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often the config file (live reload) and certificate files (rotation) "
        "are checked (default 5)",
    )
    run.add_argument(
        "--shutdown-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on SIGTERM, report unready this long before draining, so load balancers "
        "take the replica out first (default 0)",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="serve with N processes sharing the port (SO_REUSEPORT); the supervisor "
        "serves the admin port with every worker's metrics (default 1: one process)",
    )
    run.add_argument(
        "--reuse-port",
        action="store_true",
        help="bind with SO_REUSEPORT, so another instance can share the port, and hand "
        "the listening sockets to a replacement started with the same command (restarts "
        "in place without a refused or reset connection)",
    )
    run.add_argument(
        "--engine",
        choices=HTTP2_ENGINES,
        help="HTTP/2 engine of both sides (default: the config's http2.engine, auto: "
        "nghttp2 when its extension is installed, else h2)",
    )
    run.add_argument("--no-admin", action="store_true", help=argparse.SUPPRESS)  # workers
    # workers: each binds its own SO_REUSEPORT socket, none takes another's
    run.add_argument("--no-handover", action="store_true", help=argparse.SUPPRESS)
    # workers: serve on this listening socket, inherited from the supervisor
    run.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=cmd_run)

    sim = sub.add_parser(
        "sim",
        help="run simulated apiserver groups (test equipment)",
        description="Serve simulated kube-apiserver groups sharing one store, on the ports of "
        "CONFIG's http:// endpoints, with a control API for faults and counters.",
        epilog=control_api_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sim.add_argument("--config", metavar="CONFIG", help="default: config/demo.yaml")
    sim.add_argument("--control-port", type=int, default=CONTROL_PORT, metavar="PORT")
    sim.add_argument("--bookmark-interval", type=float, default=5.0, metavar="SECONDS")
    for flag, what in (
        ("--tls-cert-file", "serve https:// endpoints with this certificate"),
        ("--tls-private-key-file", "its key"),
        ("--client-ca-file", "authenticate client certificates of this CA (user=CN, groups=O)"),
        (
            "--requestheader-client-ca-file",
            "trust X-Remote-* headers from front proxies of this CA",
        ),
        ("--token-auth-file", 'static bearer tokens: CSV token,user,uid,"group1,group2"'),
    ):
        sim.add_argument(flag, metavar="FILE", help=what)
    sim.add_argument(
        "--requestheader-allowed-names",
        default="",
        metavar="NAMES",
        help="comma-separated front-proxy certificate CNs (empty: any)",
    )
    sim.set_defaults(func=cmd_sim)

    plan = sub.add_parser(
        "plan",
        help="what a cut-over would move, from an access log; apiserver flags per group",
        description="From the gateway's access log (JSON lines; '-' for stdin): per program "
        "and home group, requests/s by verb, watches/s, and what a rule "
        '`userAgent: "<program>/*"` would move off default at each percent. With '
        "--apiserver-flags: the kube-apiserver flags that make each group's watch cache "
        "match its claims in CONFIG.",
    )
    plan.add_argument("access_log", nargs="?", metavar="ACCESS_LOG", help="a file, or - for stdin")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument(
        "--percent", type=int, action="append", metavar="P", help="candidate percents (repeat)"
    )
    plan.add_argument("--config", metavar="CONFIG", help="the routing config (--apiserver-flags)")
    plan.add_argument(
        "--apiserver-flags", action="store_true", help="print each group's watch-cache flags"
    )
    plan.add_argument(
        "--group",
        metavar="GROUP",
        help="with --apiserver-flags: only GROUP's flags, one per line (for scripts)",
    )
    plan.set_defaults(func=cmd_plan)

    rollout_command.add_parser(sub)

    demo = sub.add_parser(
        "demo",
        help="simulated groups + the gateway, with live routing output",
        description="Start simulated apiserver groups (Pod, Config, Event, Default: one "
        "store) and the gateway in front of them from config/demo.yaml, write a kubeconfig "
        "for kubectl, print how to point kubectl and curl at it and how to break a group "
        "(the simulator's control API), and show live which group answered each request, "
        "fallbacks included (from an access log it writes, which `plan` reads). Ctrl-C "
        "stops everything and removes what it wrote.",
    )
    demo.add_argument("--config", metavar="CONFIG", help="default: config/demo.yaml")
    demo.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="write the demo's kubeconfig here (default: a new directory of its own); "
        "it is removed when the demo stops",
    )
    demo.add_argument(
        "--port-offset",
        type=int,
        default=0,
        metavar="N",
        help="move every port (gateway 8443, admin 9090, groups 16443-16446, control 16440) "
        "by N, when something else uses them",
    )
    demo.add_argument(
        "--control-port",
        type=int,
        metavar="PORT",
        help=f"the simulator's control API (default {CONTROL_PORT}, plus --port-offset)",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def _address(text: str | None) -> Address | None:
    if text is None:
        return None
    host, _, port = text.rpartition(":")
    return Address(host.strip("[]") or "127.0.0.1", int(port))


def _run_async(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop (the production event loop)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            return runner.run(main)
        except KeyboardInterrupt:
            return 0


def cmd_run(args: argparse.Namespace) -> int:
    from kom_gateway.server.run import RunOptions, run_gateway
    from kom_gateway.server.workers import run_workers

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return 2
    try:
        options = RunOptions(
            args.config,
            listen=_address(args.listen),
            admin=_address(args.admin),
            drain_seconds=args.drain_seconds,
            shutdown_delay=args.shutdown_delay,
            watch_seconds=args.watch_interval,
            reuse_port=args.reuse_port,
            serve_admin=not args.no_admin,
            handover=not args.no_handover,
            listen_fd=args.listen_fd,
            engine=args.engine,
        )
        if args.workers > 1:
            return _run_async(run_workers(options, args.workers, args.log_level))
        return _run_async(run_gateway(options))
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    except BindError as exc:
        print(f"kom-gateway: {exc}", file=sys.stderr)
        return 1


def cmd_sim(args: argparse.Namespace) -> int:
    from kom_gateway.demo import find_demo_config, start_simulator
    from kom_gateway.sim.auth import SimSecurity

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def serve() -> int:
        security = SimSecurity(
            args.tls_cert_file,
            args.tls_private_key_file,
            args.client_ca_file,
            args.requestheader_client_ca_file,
            tuple(n for n in args.requestheader_allowed_names.split(",") if n),
            args.token_auth_file,
        )
        sim = await start_simulator(
            args.config or find_demo_config(),
            args.control_port,
            args.bookmark_interval,
            security,
        )
        groups = ", ".join(f"{name}=127.0.0.1:{g.port}" for name, g in sim.groups.items())
        print(
            f"kom-gateway sim serving {groups}; control on 127.0.0.1:{args.control_port}",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await sim.close()
        return 0

    try:
        return _run_async(serve())
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    except BindError as exc:
        print(f"kom-gateway sim: {exc}", file=sys.stderr)
        return 1


def cmd_demo(args: argparse.Namespace) -> int:
    from kom_gateway.demo import run_demo

    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run_async(
            run_demo(args.config, args.kubeconfig, args.port_offset, args.control_port)
        )
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 1
    except BindError as exc:
        print(f"kom-gateway demo: {exc}", file=sys.stderr)
        return 1


def cmd_check(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr
    config = load_or_report(args.config, err)
    if config is None:
        return 1
    problems = [] if args.no_files else tls_problems(config)
    if problems:  # the gateway would refuse to start with these files
        print(ConfigError(problems, config.source).render(), file=err)
        if any(issue.message.endswith(MISSING_FILE) for issue in problems):
            print("hint: these files are read where the gateway runs; to check the routing "
                  "here without them, add --no-files", file=err)  # fmt: skip
        return 1
    print(describe_config(config), file=out)
    for warning in (*config.warnings, *([] if args.no_files else tls_warnings(config))):
        print(f"warning: {warning}", file=err)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from kom_gateway.plan import (
        PERCENTS,
        apiserver_flags,
        plan,
        read_access_log,
        render_apiserver_flags,
        render_plan,
    )

    out, err = sys.stdout, sys.stderr
    result: dict[str, object] = {}
    if args.apiserver_flags:
        if not args.config:
            print("--apiserver-flags needs --config CONFIG", file=err)
            return 2
        config = load_or_report(args.config, err)
        if config is None:
            return 1
        flags = apiserver_flags(config)
        if args.group is not None:
            if args.group not in flags:
                print(f"no group {args.group!r} in {args.config}", file=err)
                return 1
            for flag in flags[args.group].flags:
                print(flag, file=out)
            return 0
        result["apiserverFlags"] = {
            g: {"flags": f.flags, "uncached": f.uncached} for g, f in flags.items()
        }
        if not args.json:
            print(render_apiserver_flags(flags), file=out)
    if args.access_log:
        try:
            if args.access_log == "-":
                records, skipped = read_access_log(sys.stdin)
            else:
                with open(args.access_log, encoding="utf-8") as f:
                    records, skipped = read_access_log(f)
        except OSError as exc:
            print(f"{args.access_log}: {exc.strerror}", file=err)
            return 1
        traffic = plan(records, args.percent or PERCENTS)
        result["traffic"] = [t.as_json() for t in traffic]
        if not args.json:
            print(render_plan(traffic, skipped), file=out)
    elif not args.apiserver_flags:
        print("give an ACCESS_LOG (or -), and/or --apiserver-flags --config CONFIG", file=err)
        return 2
    if args.json:
        print(json.dumps(result, indent=2), file=out)
    return 0


def describe_config(config: Config) -> str:
    """Human-readable table of groups -> resources -> endpoints and of cut-over rules."""
    lines = [
        f"{config.source or 'config'}: OK — {len(config.groups)} groups, "
        f"{len(config.cutover)} cut-over rules",
        f"listen {config.listen}"
        + (" (TLS)" if config.listen_tls else " (plaintext h2c + HTTP/1.1)")
        + f", admin {config.admin}",
        "",
        "GROUPS",
    ]
    width = max(len(name) for name in config.groups)
    for group in config.groups.values():
        endpoints = ", ".join(str(e) for e in group.endpoints)
        lines.append(f"  {group.name:<{width}}  endpoints: {endpoints}")
        if group.name == DEFAULT_GROUP and not group.resources:
            claims = "everything not claimed below"
        elif group.name == DEFAULT_GROUP:
            claims = "everything unclaimed, and: " + ", ".join(str(c) for c in group.resources)
        else:
            claims = ", ".join(str(c) for c in group.resources) or "(nothing)"
        wrapped = textwrap.wrap(claims, 96 - width, break_on_hyphens=False) or [""]
        lines.append(f"  {'':<{width}}  resources: {wrapped[0]}")
        lines.extend(f"  {'':<{width}}             {rest}" for rest in wrapped[1:])
    lines += ["", "CUT-OVER (first matching rule wins; unmatched clients stay on default)"]
    if not config.cutover:
        lines.append("  (no rules: all traffic goes to default)")
    for rule in config.cutover:
        shares = (
            ", ".join(f"{g} {format_percent(p)}" for g, p in rule.percent.items())
            or "nothing moved"
        )
        if rule.shadow is not None:
            shares += f"; shadow: {rule.shadow.describe()}"
        lines.append(f"  [{rule.index}] {rule.label}  ->  {shares}")
    lines += ["", "OVERLOAD (429 + Retry-After past these, per gateway process)"]
    o = config.overload
    for name in config.groups:
        limits = o.limits_for(name)
        inflight = limits.max_inflight or "no limit"
        watches = limits.max_watches or "no limit"
        queue = f"{limits.max_queue_wait:g}s" if limits.max_queue_wait else "none"
        lines.append(
            f"  {name:<{width}}  in flight: {inflight} (queue: {queue}), watches: {watches}"
        )
    allowance = o.per_client.max_protected_inflight
    lines.append(f"  protected (never shed from a certificate, {allowance} in flight per "
                 f"identity; {format_percent(o.reserved_percent)} reserve): "
                 + ("; ".join(m.describe() for m in o.protected) or "none"))  # fmt: skip
    lines.append("  exempt (never shed): " + ("; ".join(m.describe() for m in o.exempt) or "none"))
    for rule in o.rate_limits:
        per = "per client" if rule.per_client else "shared"
        lines.append(
            f"  rate limit {rule.name!r}: {rule.match.describe()}  ->  {rule.qps:g} qps, "
            f"burst {rule.burst}, {per}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
