"""`kom-gateway route`: where one request goes and why, as the data plane decides it,
for a request described by flags or for a line of the access log."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from typing import Any
from urllib.parse import urlsplit

from kom_gateway.config import Config, load_or_report
from kom_gateway.kube.identity import parse_x509_identity, token_identity
from kom_gateway.kube.requestinfo import RequestInfo, parse_request
from kom_gateway.routing import Client, Decision
from kom_gateway.routing.cutover import format_percent, user_agent_product
from kom_gateway.routing.router import (
    REASON_CUT_OVER,
    REASON_HOME_IS_DEFAULT,
    REASON_NO_RULE,
    REASON_NOT_CUT_OVER,
)


def add_parser(sub: Any) -> None:
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
        help="the client key as the access log prints it (`client`: x509:CN=<user>,O=<group>"
        "|<program>, token:<32 hex>|<program>, addr:<ip>|<program>, anonymous|<program>), or "
        "its identity part alone, or an IP address; an x509 key implies --user/--group",
    )
    route.add_argument(
        "--token",
        default="",
        metavar="TOKEN",
        help="a raw bearer token, turned into its key as the gateway does (token:<digest>)",
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
    route.add_argument(
        "--log-line",
        default="",
        metavar="JSON",
        help="one line of the access log: decide for that request and client exactly as the "
        "data plane did (instead of METHOD URL and the client flags)",
    )
    route.add_argument("method", metavar="METHOD", nargs="?")
    route.add_argument("url", metavar="URL", nargs="?", help="path with query, or a full URL")
    route.set_defaults(func=cmd_route)


def cmd_route(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr
    config = load_or_report(args.config, err)
    if config is None:
        return 1
    try:
        info, client = (
            logged_request(args.log_line) if args.log_line else _route_request(args, config)
        )
    except ValueError as exc:
        print(exc, file=err)
        return 2
    router = config.router()
    decision = router.decide(info, client)
    rule = decision.rule
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
            "shadow": rule.shadow.as_json() if rule.shadow is not None else None,
        },
        "percent": decision.percent,
        "explanation": explain(decision, client),
    }
    print(json.dumps(result, indent=2), file=out)
    return 0


def _route_request(args: argparse.Namespace, config: Config) -> tuple[RequestInfo, Client]:
    """The request and client `route`'s flags describe; ValueError saying what to fix."""
    if not args.method or not args.url:
        raise ValueError("give METHOD and URL (or --log-line)")
    parts = urlsplit(args.url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    info = parse_request(args.method.upper(), target)
    try:
        identity, remote_addr, program = parse_client_key(args.client)
    except ValueError as exc:
        raise ValueError(f"--client: {exc}") from None
    if args.token:
        if identity:
            raise ValueError("--client and --token name two identities: give one")
        identity = token_identity(args.token.encode())
    if program and not args.user_agent and any(r.match.user_agent for r in config.cutover):
        # the key names the program; rules match the whole User-Agent, which it does not
        # carry: a guess here would be a confident wrong answer
        raise ValueError(
            f"--client names the program {program!r}, but cut-over rules match the whole "
            "User-Agent: add --user-agent as the access log's `userAgent` shows it, or give "
            "the whole line with --log-line"
        )
    user_agent = args.user_agent or program
    if program and user_agent_product(user_agent) != program:
        raise ValueError(
            f"--client is for program {program!r}, --user-agent for "
            f"{user_agent_product(user_agent)!r}: give one"
        )
    user, groups = args.user, tuple(args.groups)
    from_cert = parse_x509_identity(identity)
    if from_cert is not None:  # a verified certificate names its user and groups
        user = user or from_cert[0]
        groups = groups or from_cert[1]
    return info, Client(user_agent, identity, remote_addr, user, groups)


def logged_request(line: str) -> tuple[RequestInfo, Client]:
    """The request and client of one access-log line, as the data plane saw them (what
    routing reads: the resource, the User-Agent, the identity and what it verified)."""
    try:
        entry = json.loads(line)
        key, user_agent = entry["client"], entry.get("userAgent") or ""
        identity, remote_addr, _ = parse_client_key(key)
        path = entry.get("path")
        info = RequestInfo(
            verb=entry["verb"],
            path=path or "",
            is_resource_request=path is None,
            api_group=entry.get("apiGroup") or "",
            api_version=entry.get("apiVersion") or "",
            namespace=entry.get("namespace") or "",
            resource=entry.get("resource") or "",
            subresource=entry.get("subresource") or "",
            name=entry.get("name") or "",
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"--log-line: not an access-log line ({exc})") from None
    user, groups = entry.get("user") or "", ()
    from_cert = parse_x509_identity(identity)
    if from_cert is not None:
        user, groups = from_cert
    return info, Client(user_agent, identity, remote_addr, user, groups)


def explain(decision: Decision, client: Client) -> str:
    """One sentence an operator can read aloud."""
    if decision.reason == REASON_HOME_IS_DEFAULT:
        return "no group claims this request, so it goes to default"
    if decision.reason == REASON_NO_RULE:
        return (
            f"{decision.home} claims it, but no cut-over rule matches this client, "
            "so it stays on default"
        )
    pct = format_percent(decision.percent or 0.0)
    index = decision.rule.index if decision.rule is not None else None
    if decision.reason == REASON_CUT_OVER:
        return (
            f"{decision.home} claims it; rule [{index}] moves {pct} of its clients "
            f"and this client's bucket {client.bucket:.2f} is below that, so it goes to "
            f"{decision.home}"
        )
    assert decision.reason == REASON_NOT_CUT_OVER
    said = (
        f"{decision.home} claims it; rule [{index}] moves {pct} of its clients and "
        f"this client's bucket {client.bucket:.2f} is not below that, so it stays on "
        f"default until the percent exceeds {client.bucket:.2f}"
    )
    shadow = decision.rule.shadow if decision.rule is not None else None
    if shadow is not None and shadow.group == decision.home:
        said += (
            f"; its reads (get, list) are shadowed: "
            f"{shadow.describe()} and compared"
        )
    return said


CLIENT_KEY_FORMS = (
    "x509:CN=<user>,O=<group>,...|<program>, token:<32 hex digits>|<program>, "
    "addr:<ip>|<program>, anonymous|<program> (the access log's `client`), the same "
    "without |<program>, or an IP address"
)


def parse_client_key(key: str) -> tuple[str, str, str]:
    """(identity, remote address, program) of a client key as the access log prints it
    (`Client.key`), or of its parts; ValueError naming the accepted forms otherwise."""
    if not key:
        return "", "", ""
    who, sep, program = key.rpartition("|")
    if not sep:
        who, program = key, ""
    if who.startswith("x509:CN="):
        return who, "", program
    if who.startswith("token:"):
        digest = who[6:]
        if len(digest) == 32 and all(c in "0123456789abcdef" for c in digest):
            return who, "", program
        raise ValueError(
            f"{who!r} is not a token key: the gateway keys tokens by a 32-hex digest "
            "(give --token for a raw token)"
        )
    if who == "anonymous":
        return "", "", program
    address = who[5:] if who.startswith("addr:") else who
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{key!r} is not a client key; accepted: {CLIENT_KEY_FORMS}") from None
    return "", address, program
