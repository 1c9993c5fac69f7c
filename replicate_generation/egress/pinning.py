"""Connect to the address that was checked, never to a second DNS answer: the request goes to the
IP with the host's name in `Host`, and TLS (SNI, certificate check) is done as that name."""

from __future__ import annotations

import http.cookiejar
import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import requests
from requests.adapters import HTTPAdapter

from replicate_generation.egress.addresses import IP
from replicate_generation.egress.urls import Target

if TYPE_CHECKING:
    from requests.adapters import _HostParams, _PoolKwargs

MAX_ADDRESSES = 3  # addresses of one host tried in turn when a connection cannot be made

Try = tuple[str, dict[str, str]]
"""(url, extra headers) of one try: the name itself, or one checked address."""


class PinnedHostAdapter(HTTPAdapter):
    """For a request sent to an IP address with a ``Host`` header naming a host, do TLS as that
    host: SNI and the certificate's name check use the Host header's name, not the IP."""

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: bool | str,
        cert: str | tuple[str, str] | None = None,
    ) -> tuple[_HostParams, _PoolKwargs]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert)
        host_header = request.headers.get("Host")
        if (host_params["scheme"] == "https" and _is_ip(str(host_params["host"]))
                and host_header and "]" not in host_header):
            name = host_header.rsplit(":", 1)[0]
            if not _is_ip(name):
                # A pool-key field: pools for different names never share connections.
                cast("dict[str, object]", pool_kwargs)["server_hostname"] = name
        return host_params, pool_kwargs


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def new_session() -> requests.Session:
    """A Session fit for pinned requests: no proxies, .netrc or cookies from the environment, and
    TLS to a pinned address checked against the host's name (a plain Session fails that check)."""
    session = requests.Session()
    session.trust_env = False
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    adapter = PinnedHostAdapter(max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def pinned_tries(target: Target, addresses: Sequence[IP] | None) -> list[Try]:
    """The URL by name (unchecked targets, literal addresses), or each checked address in turn."""
    if addresses is None or target.ip is not None:
        return [(target.url, {})]
    tries: list[Try] = []
    for address in addresses[:MAX_ADDRESSES]:
        shown = f"[{address.compressed}]" if address.version == 6 else address.compressed
        tries.append((f"{target.scheme}://{shown}:{target.port}{target.request_target}",
                      {"Host": target.host_header}))
    return tries
