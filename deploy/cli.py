"""The ``diffgraph`` command line. Each package contributes its commands through ``register(app)``."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="diffgraph",
    help="DiffGraph: merge online text-to-image experts on demand.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Order decides the order of commands in --help.
_COMMAND_MODULES = (
    "deploy.commands",
    "graphdb.cli",
    "crawler.cli",
    "calibration.cli",
    "planner.cli",
    "merger.cli",
    "evaluation.cli",
    "deploy.generate_cli",
    "deploy.demo",
    "world.cli",
)


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that package has no CLI yet
                continue
            raise
        module.register(app)


_register_all()


def _quiet_libraries() -> None:
    """Library chatter (CLIP's 77-token truncation notice, progress bars) drowns the CLI's own output."""
    import logging
    import os

    from core.settings import get_settings

    level = get_settings().log_level.upper()
    # A level on the handler, not only the root: Scrapy resets the root logger to NOTSET when it starts.
    handler = logging.StreamHandler()
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(level)
    if level != "DEBUG":
        for name in ("diffusers", "transformers", "scrapy", "sentence_transformers", "httpx", "py.warnings"):
            logging.getLogger(name).setLevel(logging.ERROR)
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    _quiet_libraries()
    app()


if __name__ == "__main__":
    main()
