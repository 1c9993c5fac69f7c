"""Durable jobs: the runner, its store and webhook delivery."""
