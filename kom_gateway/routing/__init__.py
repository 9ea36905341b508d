"""Routing brain: resource claims, per-client cut-over, and the decision that joins them."""

from kom_gateway.routing.claims import ClaimTable, ResourceClaim, parse_claim
from kom_gateway.routing.cutover import Client, CutoverRule, Match, bucket_of
from kom_gateway.routing.glob import Glob
from kom_gateway.routing.router import DEFAULT_GROUP, Decision, Router

__all__ = [
    "DEFAULT_GROUP",
    "ClaimTable",
    "Client",
    "CutoverRule",
    "Decision",
    "Glob",
    "Match",
    "ResourceClaim",
    "Router",
    "bucket_of",
    "parse_claim",
]
