"""The Typer apps of each command group, declared here so command modules can register on them."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="refground",
    help="Visual grounding toolkit: synthetic world, real-format importers, feature cache, five methods, "
    "evaluation. Add --debug anywhere to see tracebacks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Datasets: generate the synthetic world, import/export real formats, statistics.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
train_app = typer.Typer(help="Train a model: the built-in detector, and the methods (later issues).",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")
cache_app = typer.Typer(help="The artifact cache: list what is there, verify it.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
pseudo_app = typer.Typer(help="Pseudo ground truth: contextual objects for VL-NMS (later: BiCM pairs, ReIR "
                         "relation labels).", no_args_is_help=True)
app.add_typer(pseudo_app, name="pseudo")
