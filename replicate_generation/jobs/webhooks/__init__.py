"""Job-completion webhooks, signed the Standard Webhooks way, sent only to checked addresses.

signing, targets (the URL policy: docs/webhooks.md), delivery (one attempt) and retries (backoff);
addresses are checked and pinned by the egress package (`new_session` is its pinned Session).
Nothing here sleeps or keeps state.
"""

from replicate_generation.egress import Resolver, new_session
from replicate_generation.errors import InvalidWebhook
from replicate_generation.jobs.webhooks.delivery import USER_AGENT, DeliveryResult, deliver
from replicate_generation.jobs.webhooks.retries import MAX_ATTEMPTS, backoff, retry_delay
from replicate_generation.jobs.webhooks.signing import (
    new_msg_id,
    new_secret,
    secret_bytes,
    sign,
    verify,
)
from replicate_generation.jobs.webhooks.targets import check_target

__all__ = [
    "MAX_ATTEMPTS",
    "USER_AGENT",
    "DeliveryResult",
    "InvalidWebhook",
    "Resolver",
    "backoff",
    "check_target",
    "deliver",
    "new_msg_id",
    "new_secret",
    "new_session",
    "retry_delay",
    "secret_bytes",
    "sign",
    "verify",
]
