"""The Typer apps of the static command groups, declared here so command modules can register on them.

The method commands (``train``, ``report``, ``pseudo``, ``eval``, ``show``) are built from the method registry
each time :func:`refground.cli.main.build_app` runs, so a method registered at run time appears in them."""

from __future__ import annotations

import typer

APP_SETTINGS = dict(
    name="refground",
    help="Visual grounding toolkit: synthetic world, real-format importers, feature cache, five methods, "
    "evaluation. Add --debug anywhere to see tracebacks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app = typer.Typer(**APP_SETTINGS)
data_app = typer.Typer(help="Datasets: generate the synthetic world, import/export real formats, statistics.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
cache_app = typer.Typer(help="The artifact cache: list what is there, verify it.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
