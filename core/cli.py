"""Small helpers shared by every package's CLI commands (one-line errors, JSON on stdout)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from rich.console import Console

from core.types import DiffGraphError

console = Console(stderr=True)  # human output goes to stderr so --json stdout stays clean
out = Console()


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: <message>`` on one line and exit non-zero."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def deprecated(old: str, new: str) -> None:
    """Say on stderr that flag ``old`` still works but is spelled ``new`` now (the public-interface rule)."""
    console.print(f"[yellow]deprecated:[/] {old} is now {new}; {old} still works for now", highlight=False,
                  soft_wrap=True)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn expected failures into one clear line and exit code 1 (2 for bad usage is Typer's)."""
    try:
        yield
    except typer.Exit:
        raise
    except DiffGraphError as exc:
        fail(str(exc))
    except (FileNotFoundError, PermissionError, ValueError) as exc:
        fail(str(exc))
