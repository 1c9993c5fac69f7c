"""The users' tokens a process keeps in memory, never on disk: an account's token stays while the
account has work here or its orphaned jobs have not been looked for yet, so those jobs can
resume here; an idle account's token and client are dropped."""

from __future__ import annotations

import threading

from replicate_generation.clients import account_key
from replicate_generation.generation import Generator


class AccountMemory:
    """Tokens of accounts with work here, or not yet checked for orphans; dropped once idle."""

    def __init__(self, generator: Generator, server_token: str | None, lock: threading.Lock,
                 wake: threading.Event) -> None:
        self._generator = generator
        self._server_account = account_key(server_token) if server_token else None
        # The runner's lock, which guards these two as well as its own state.
        self._lock = lock
        self._wake = wake
        self._tokens: dict[str, str] = {}
        self._unchecked: set[str] = set()

    def remember(self, token: str) -> None:
        """Keep a caller's token in memory until its orphaned jobs were looked for and its work
        here ended, so that its orphaned jobs can resume here."""
        account = account_key(token)
        if self._generator.runtime.clients.rejected_for(account) is not None:
            return  # Replicate refuses it: nothing could resume with it
        with self._lock:
            known = account in self._tokens
            self._tokens[account] = token
            if not known:
                self._unchecked.add(account)
        if not known:
            self._wake.set()

    def held(self) -> dict[str, int]:
        """What this process keeps in memory per account: clients and remembered tokens."""
        with self._lock:
            remembered = len(self._tokens)
        return {"clients_cached": self._generator.runtime.clients.cached(),
                "tokens_remembered": remembered}

    def idle(self, account: str) -> None:
        """The account has nothing queued or running here: keep nothing for it."""
        if account == self._server_account:
            return  # one, from the settings: its warm client is worth keeping
        self._generator.runtime.clients.forget(account)
        with self._lock:
            if account not in self._unchecked:
                self._tokens.pop(account, None)

    def to_check(self) -> tuple[dict[str, str], set[str]]:
        """(every token held, by account; the accounts not yet checked for orphans)."""
        with self._lock:
            return dict(self._tokens), set(self._unchecked)

    def checked(self, accounts: set[str]) -> None:
        """These accounts' orphans were looked for: forget those with no work here."""
        with self._lock:
            self._unchecked -= accounts
        self._forget_idle(accounts)

    def _forget_idle(self, accounts: set[str]) -> None:
        """Drop the tokens of these (just checked) accounts unless they still have work here."""
        dispatcher = self._generator.dispatcher
        idle = [a for a in accounts if a != self._server_account and not dispatcher.busy(a)]
        with self._lock:
            for account in idle:
                if account not in self._unchecked:
                    self._tokens.pop(account, None)
        for account in idle:
            self._generator.runtime.clients.forget(account)
