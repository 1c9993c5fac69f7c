"""The `status` command: the account's live limits and in-flight work, here or on a service."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import requests

from replicate_generation.errors import SettingsError
from replicate_generation.library import global_status, load_settings

HTTP_TIMEOUT = 10.0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `status`."""
    command = commands.add_parser(
        "status", help="live limits, in-flight predictions and waiters for an account")
    command.add_argument("--service-url", help="ask this service's /status instead of STATE_FILE")
    command.add_argument("--api-key", help="the service's admin key (every account)")
    command.add_argument("--replicate-token", help="the account to show (default "
                         "$REPLICATE_API_TOKEN)")
    command.add_argument("--json", action="store_true", help="print JSON")
    command.set_defaults(func=run_status)


def run_status(args: argparse.Namespace) -> int:
    try:
        status = _from_service(args) if args.service_url else _local(args)
    except (SettingsError, requests.RequestException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        for key, value in status.items():
            print(f"{key:>24}: {value}")
    return 0


def _local(args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings()
    token = args.replicate_token or settings.replicate_api_token
    if not token:
        raise SettingsError("give --replicate-token or set REPLICATE_API_TOKEN")
    return global_status(token=token, settings=settings)


def _from_service(args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings()
    headers = {}
    if args.api_key or (settings.admin_api_key and not args.replicate_token):
        headers["X-Admin-API-Key"] = args.api_key or settings.admin_api_key
    elif args.replicate_token or settings.replicate_api_token:
        headers["X-Replicate-API-Key"] = args.replicate_token or settings.replicate_api_token
    answer = requests.get(args.service_url.rstrip("/") + "/status", headers=headers,
                          timeout=HTTP_TIMEOUT)
    answer.raise_for_status()
    body: dict[str, Any] = answer.json()
    return body
