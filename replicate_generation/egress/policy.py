"""The egress policy every fetch that is not Replicate's API runs under: which URLs and addresses
it may reach, how many redirects, how slow and how long a transfer may be, how far a body may
inflate; `check` turns one URL (or redirect hop) into the addresses to pin."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from replicate_generation.egress.addresses import (
    IP,
    Network,
    Resolver,
    checked_addresses,
    in_networks,
    is_public,
)
from replicate_generation.egress.urls import Target, parse_target
from replicate_generation.errors import EgressRefused

MAX_URL_LENGTH = 8192  # signed delivery URLs run to a few KiB

Origin = tuple[str, str, int]


@dataclass(frozen=True)
class Hop:
    """One URL checked: where to connect (None: by name, for a trusted origin's literal)."""

    target: Target
    addresses: list[IP] | None


@dataclass(frozen=True)
class EgressPolicy:
    """What outbound fetches may do; the defaults are the service's (see README Configuration)."""

    allow_private: tuple[Network, ...] = ()  # EGRESS_ALLOW_PRIVATE
    trusted_origins: tuple[Origin, ...] = ()  # Replicate's own (REPLICATE_BASE_URL)
    max_redirects: int = 5
    min_bytes_per_second: int = 32 * 1024
    stall_seconds: float = 10.0  # the rate is measured over this window; also the read timeout
    download_seconds: float = 120.0  # one file, retries included
    max_decompression_ratio: float = 100.0
    resolve: Resolver | None = None  # the system resolver unless a test gives one

    def trusting(self, urls: Iterable[str]) -> EgressPolicy:
        """This policy, also letting these URLs' origins through whatever their address."""
        origins = tuple(parse_target(url, label="trusted URL", max_length=MAX_URL_LENGTH).origin
                        for url in urls)
        return replace(self, trusted_origins=(*self.trusted_origins, *origins))

    def allows(self, ip: IP) -> bool:
        return is_public(ip) or in_networks(ip, self.allow_private)

    def check(self, url: str, *, label: str = "output URL") -> Hop:
        """Check one URL: its shape, then every address its host has (pinned by the caller).

        :raises EgressRefused: a shape, scheme or address the policy refuses.
        """
        target = parse_target(url, label=label, max_length=MAX_URL_LENGTH)
        if target.origin in self.trusted_origins:
            if target.ip is not None:
                return Hop(target, None)
            return Hop(target, checked_addresses(target.host, target.port, self.resolve,
                                                 lambda _ip: True, what=f"{label}'s host"))
        if target.ip is not None:
            if not self.allows(target.ip):
                raise EgressRefused(f"{label} points to a non-public address "
                                    "(EGRESS_ALLOW_PRIVATE names the ranges allowed)")
            return Hop(target, [target.ip])
        return Hop(target, checked_addresses(target.host, target.port, self.resolve,
                                             self.allows, what=f"{label}'s host"))
