"""`kom-gateway rollout run|status SPEC`: argument parsing and exit codes. The rollout
machinery (ruamel.yaml, the Kubernetes client) is imported only when a rollout command
runs, never by the gateway process."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from typing import Any

EPILOG = """exit codes of run: 0 the rollout completed (or was stopped; run again to resume),
1 an error (nothing written), 2 bad usage, 3 rolled back, 4 paused."""


def add_parser(sub: Any) -> None:
    rollout = sub.add_parser(
        "rollout",
        help="move a cut-over rule's percent step by step, guarded by SLOs, with rollback",
        description="Drive one cut-over rule's percent for one group through the steps of "
        "SPEC, holding each and checking guards (error, fallback and p99 of the requests the "
        "rule moved, from the gateways' metrics) before the next; roll back or pause when a "
        "guard fails. See docs/migration.md.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = rollout.add_subparsers(metavar="ACTION")
    run = verbs.add_parser("run", help="execute the rollout (resumes a stopped one)", epilog=EPILOG)
    run.add_argument("spec", metavar="SPEC", help="the rollout spec (YAML)")
    run.add_argument(
        "--dry-run", action="store_true", help="print the planned edits; write nothing"
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue a paused or rolled-back rollout from the configured percent",
    )
    run.add_argument("--restart", action="store_true", help="forget the saved state and start over")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=cmd_rollout_run)
    st = verbs.add_parser("status", help="where a rollout is and what happens next")
    st.add_argument("spec", metavar="SPEC", help="the rollout spec (YAML)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--dry-run", action="store_true", help="also print the edits still to come")
    st.set_defaults(func=cmd_rollout_status)
    rollout.set_defaults(func=lambda args: (rollout.print_help(), 2)[1])


def _open(args: argparse.Namespace) -> tuple[Any, Any]:
    from kom_gateway.rollout.spec import load_spec_file
    from kom_gateway.rollout.targets import open_target

    spec = load_spec_file(args.spec)
    return spec, open_target(spec.target, spec.label, spec.group)


def _errors() -> tuple[type[Exception], ...]:
    from kom_gateway.rollout.edit import EditError
    from kom_gateway.rollout.runner import RolloutError
    from kom_gateway.rollout.spec import SpecError
    from kom_gateway.rollout.targets import TargetError

    return (SpecError, TargetError, RolloutError, EditError)


def cmd_rollout_run(args: argparse.Namespace) -> int:
    from kom_gateway.rollout.runner import Rollout, dry_run, make_source

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        spec, target = _open(args)
        if args.dry_run:
            return dry_run(spec, target, sys.stdout)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        return Rollout(spec, target, make_source(spec)).run(stop, args.resume, args.restart)
    except _errors() as exc:
        print(f"kom-gateway rollout: {exc}", file=sys.stderr)
        return 1


def cmd_rollout_status(args: argparse.Namespace) -> int:
    from kom_gateway.rollout.runner import dry_run, status

    try:
        spec, target = _open(args)
        status(spec, target, sys.stdout, args.json, time.time())
        if args.dry_run:
            print()
            dry_run(spec, target, sys.stdout)
        return 0
    except _errors() as exc:
        print(f"kom-gateway rollout: {exc}", file=sys.stderr)
        return 1
