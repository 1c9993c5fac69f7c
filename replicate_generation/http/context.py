"""What every request works with, kept on the Flask app by `create_app`: the settings, the job
runner and its engine, the fallback chains and the policy for non-curated models."""

from __future__ import annotations

from typing import cast

from flask import Flask, current_app

from replicate_generation.generation import Generator
from replicate_generation.jobs.runner import JobRunner
from replicate_generation.models.chains import FallbackChains
from replicate_generation.models.schemas import ModelPolicy
from replicate_generation.settings import Settings


def install(app: Flask, settings: Settings, runner: JobRunner) -> None:
    """Keep them under the keys the routes (and the tests) read."""
    app.extensions["settings"] = settings
    app.extensions["chains"] = settings.fallback_chains
    app.extensions["model_policy"] = settings.model_policy
    app.extensions["jobs"] = runner
    app.extensions["generator"] = runner.generator


def settings() -> Settings:
    return cast(Settings, current_app.extensions["settings"])


def runner() -> JobRunner:
    return cast(JobRunner, current_app.extensions["jobs"])


def generator() -> Generator:
    return cast(Generator, current_app.extensions["generator"])


def chains() -> FallbackChains:
    return cast(FallbackChains, current_app.extensions["chains"])


def model_policy() -> ModelPolicy:
    return cast(ModelPolicy, current_app.extensions["model_policy"])
