"""Which webhook URLs are accepted: the URL's shape, and for user callers only public addresses
(or ranges EGRESS_ALLOW_PRIVATE names), checked by the egress package.

`parse_target` checks the URL without DNS; `public_addresses` resolves the host and checks
every address, which delivery then connects to (no second DNS answer is trusted).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from replicate_generation import egress
from replicate_generation.egress import IP, Network, Resolver, Target
from replicate_generation.errors import EgressRefused, InvalidWebhook

MAX_URL_LENGTH = 2048

_is_public = egress.is_public


def _accepts(allowed: Sequence[Network]) -> Callable[[IP], bool]:
    def accept(ip: IP) -> bool:
        # _is_public looked up at each call, so the module's one rule is the one applied.
        return _is_public(ip) or egress.in_networks(ip, allowed)
    return accept


def parse_target(url: object, *, allow_private: bool,
                 allowed: Sequence[Network] = ()) -> Target:
    """Validate the URL's shape and policy (no DNS); return its normalised parts."""
    if not isinstance(url, str) or not url:
        raise InvalidWebhook("webhook must be a URL string")
    try:
        return egress.parse_target(url, label="webhook URL", max_length=MAX_URL_LENGTH,
                                   https_only=not allow_private,
                                   literal_ok=None if allow_private else _accepts(allowed))
    except EgressRefused as exc:
        raise InvalidWebhook(exc.message) from None


def public_addresses(target: Target, resolve: Resolver | None,
                     allowed: Sequence[Network] = ()) -> list[IP]:
    """Every address the target's host resolves to, all checked public, in resolver order.

    :raises InvalidWebhook: does not resolve (retryable), or resolves to any non-public address.
    """
    if target.ip is not None:
        return [target.ip]
    try:
        return egress.checked_addresses(target.host, target.port, resolve, _accepts(allowed),
                                        what="webhook host")
    except EgressRefused as exc:
        raise InvalidWebhook(exc.message, retryable=exc.retryable) from None


def check_target(url: object, *, allow_private: bool, resolve: Resolver | None = None,
                 allowed: Sequence[Network] = ()) -> str:
    """Validate a webhook URL against the SSRF policy (docs/webhooks.md); return it normalised.

    ``resolve`` replaces the system resolver (tests); ``allowed``: private ranges let through
    (EGRESS_ALLOW_PRIVATE); InvalidWebhook never quotes the URL.
    """
    target = parse_target(url, allow_private=allow_private, allowed=allowed)
    if not allow_private:
        public_addresses(target, resolve, allowed)
    return target.url
