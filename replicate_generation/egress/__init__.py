"""The one egress policy for every fetch that is not Replicate's API (outputs, webhooks).

addresses (public only, named private ranges, resolution checked), urls (a URL's shape), pinning
(connect to the checked address), policy (`EgressPolicy`), transfer (a GET: redirects, rate,
deadline, inflation), bounds (files and bytes per prediction and job), base (`Egress`).
"""

from replicate_generation.egress.addresses import (
    IP,
    Network,
    Resolver,
    checked_addresses,
    in_networks,
    is_public,
    parse_networks,
)
from replicate_generation.egress.base import Egress
from replicate_generation.egress.bounds import Budget, OutputBounds
from replicate_generation.egress.pinning import Try, new_session, pinned_tries
from replicate_generation.egress.policy import EgressPolicy
from replicate_generation.egress.transfer import never_connected, open_get, read_body
from replicate_generation.egress.urls import Target, parse_target
from replicate_generation.errors import EgressRefused

__all__ = [
    "IP",
    "Budget",
    "Egress",
    "EgressPolicy",
    "EgressRefused",
    "Network",
    "OutputBounds",
    "Resolver",
    "Target",
    "Try",
    "checked_addresses",
    "in_networks",
    "is_public",
    "never_connected",
    "new_session",
    "open_get",
    "parse_networks",
    "parse_target",
    "pinned_tries",
    "read_body",
]
