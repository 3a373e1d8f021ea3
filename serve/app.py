"""The application builder for ``serve run`` / ``serve deploy`` (``import_path: serve.app:build``).

``args`` are ``ServeOptions.to_args()``, as ``python -m serve.config`` writes them into the config.
"""
from __future__ import annotations

from typing import Any

from .config import ServeOptions
from .deployments import build_application


def build(args: dict[str, Any]) -> Any:
    return build_application(ServeOptions.from_args(args))
