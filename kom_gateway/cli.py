"""`kom-gateway` command line: check a routing config, predict a routing decision."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import textwrap
from collections.abc import Sequence
from typing import TextIO
from urllib.parse import urlsplit

from kom_gateway import __version__
from kom_gateway.config import Config, ConfigError, load_config_file
from kom_gateway.requestinfo import parse_request
from kom_gateway.routing import DEFAULT_GROUP, Client, Decision
from kom_gateway.routing.cutover import parse_x509_identity
from kom_gateway.routing.router import (
    REASON_CUT_OVER,
    REASON_HOME_IS_DEFAULT,
    REASON_NO_RULE,
    REASON_NOT_CUT_OVER,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kom-gateway",
        description="Route Kubernetes API traffic by resource to groups of kube-apiservers.",
    )
    parser.add_argument("--version", action="version", version=f"kom-gateway {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    check = sub.add_parser("check", help="validate a routing config and print what it does")
    check.add_argument("config", metavar="CONFIG")
    check.set_defaults(func=cmd_check)

    route = sub.add_parser(
        "route",
        help="predict where one request goes, and why (JSON)",
        description="Print the parsed request, home group, chosen group and the reason, as "
        "the gateway would decide it with CONFIG.",
    )
    route.add_argument("--config", required=True, metavar="CONFIG")
    route.add_argument("--user-agent", default="", metavar="UA", help="the client's User-Agent")
    route.add_argument(
        "--client",
        default="",
        metavar="KEY",
        help="the client's identity as the gateway sees it: a verified certificate "
        "(x509:CN=<user>,O=<group>,...; implies --user/--group), token:<hash>, or its IP address",
    )
    route.add_argument("--user", default="", help="verified user name (for match.user)")
    route.add_argument(
        "--group",
        dest="groups",
        action="append",
        default=[],
        metavar="GROUP",
        help="verified user group (for match.userGroup); repeat for several",
    )
    route.add_argument("method", metavar="METHOD")
    route.add_argument("url", metavar="URL", help="path with query, or a full URL")
    route.set_defaults(func=cmd_route)
    return parser


def _load(path: str, err: TextIO) -> Config | None:
    try:
        return load_config_file(path)
    except ConfigError as exc:
        print(exc.render(), file=err)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr
    config = _load(args.config, err)
    if config is None:
        return 1
    print(describe_config(config), file=out)
    for warning in config.warnings:
        print(f"warning: {warning}", file=err)
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
        shares = ", ".join(f"{g} {_pct(p)}" for g, p in rule.percent.items()) or "nothing moved"
        lines.append(f"  [{rule.index}] {rule.match.describe()}  ->  {shares}")
    return "\n".join(lines)


def cmd_route(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr
    config = _load(args.config, err)
    if config is None:
        return 1
    parts = urlsplit(args.url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    info = parse_request(args.method.upper(), target)
    is_address = _looks_like_address(args.client)
    user, groups = args.user, tuple(args.groups)
    from_cert = parse_x509_identity(args.client)
    if from_cert is not None:  # a verified certificate names its user and groups
        user = user or from_cert[0]
        groups = groups or from_cert[1]
    client = Client(
        user_agent=args.user_agent,
        identity="" if is_address else args.client,
        remote_addr=args.client if is_address else "",
        user=user,
        groups=groups,
    )
    router = config.router()
    decision = router.decide(info, client)
    rule = config.cutover[decision.rule] if decision.rule is not None else None
    result = {
        "request": info.as_json(),
        "client": {
            "key": client.key,
            "userAgent": client.user_agent,
            "user": client.user,
            "groups": list(client.groups),
            "bucket": round(client.bucket, 4),
        },
        "homeGroup": decision.home,
        "chosenGroup": decision.target,
        "reason": decision.reason,
        "rule": None
        if rule is None
        else {
            "index": rule.index,
            "line": rule.line,
            "match": rule.match.as_json(),
            "percent": dict(rule.percent),
        },
        "percent": decision.percent,
        "explanation": explain(decision, client),
    }
    print(json.dumps(result, indent=2), file=out)
    return 0


def explain(decision: Decision, client: Client) -> str:
    """One sentence an operator can read aloud."""
    if decision.reason == REASON_HOME_IS_DEFAULT:
        return "no group claims this request, so it goes to default"
    if decision.reason == REASON_NO_RULE:
        return (
            f"{decision.home} claims it, but no cut-over rule matches this client, "
            "so it stays on default"
        )
    pct = _pct(decision.percent or 0.0)
    if decision.reason == REASON_CUT_OVER:
        return (
            f"{decision.home} claims it; rule [{decision.rule}] moves {pct} of its clients "
            f"and this client's bucket {client.bucket:.2f} is below that, so it goes to "
            f"{decision.home}"
        )
    assert decision.reason == REASON_NOT_CUT_OVER
    return (
        f"{decision.home} claims it; rule [{decision.rule}] moves {pct} of its clients and "
        f"this client's bucket {client.bucket:.2f} is not below that, so it stays on "
        f"default until the percent exceeds {client.bucket:.2f}"
    )


def _pct(value: float) -> str:
    return f"{value:g}%"


def _looks_like_address(key: str) -> bool:
    """An IP (v4 or v6) rather than an identity string."""
    try:
        ipaddress.ip_address(key)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
