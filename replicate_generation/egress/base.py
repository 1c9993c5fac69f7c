"""`Egress`: what one process's outbound fetches run under, the policy and the output bounds,
with each job's running tally."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

from replicate_generation.egress.bounds import Budget, JobTallies, OutputBounds
from replicate_generation.egress.policy import EgressPolicy


class Egress:
    """The policy and bounds of this process; `budget` opens one prediction's allowance."""

    def __init__(self, policy: EgressPolicy | None = None,
                 bounds: OutputBounds | None = None) -> None:
        self.policy = policy if policy is not None else EgressPolicy()
        self.bounds = bounds if bounds is not None else OutputBounds()
        self._jobs = JobTallies(self.bounds)

    def budget(self, directory: Path) -> AbstractContextManager[Budget]:
        """A prediction's budget inside the job whose outputs go to `directory`."""
        return self._jobs.budget(directory)
