"""Options shared by several commands, declared once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

CacheOpt = Annotated[
    Optional[Path],
    typer.Option("--cache", help="Artifact root (default: $REFGROUND_CACHE or ./cache).", show_default=False),
]
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="Dataset name: the folder under the cache root.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed; the same inputs and seed give the same artifacts.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the figures as one JSON object on stdout (no table).")]
ResumeOpt = Annotated[bool, typer.Option("--resume/--no-resume", help="Continue an interrupted run with the same "
                                          "config and seed after its last finished epoch.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the step even if its artifact is complete.")]
SplitOpt = Annotated[
    str,
    typer.Option("--split", help="Split: train, val, test, testA, testB, testC, testAB, testBC, testAC or all "
                 "(refer semantics: testA includes testAB)."),
]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output file.", show_default=False)]


def read_config_file(path: Path, what: str) -> dict:
    """The JSON object of a ``--config`` file (``what`` names its fields in the error), or a one-line UsageError."""
    import json

    from refground.errors import UsageError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable config ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object of {what} fields")
    return data


def training_overrides(**options: Any) -> dict[str, Any]:
    """The config fields given as options (None: not given), checked with the option's name in the error:
    ``epochs`` and ``batch_size`` at least 1, ``lr`` positive, ``lr_decay_epochs`` at least 0."""
    from refground.errors import UsageError

    given = {k: v for k, v in options.items() if v is not None}
    for key, ok, rule in (("epochs", lambda v: v >= 1, "must be at least 1"),
                          ("batch_size", lambda v: v >= 1, "must be at least 1"),
                          ("lr", lambda v: v > 0, "must be positive"),
                          ("lr_decay_epochs", lambda v: v >= 0, "must be at least 0")):
        if key in given and not ok(given[key]):
            raise UsageError(f"--{key.replace('_', '-')} {given[key]}: {rule}")
    return given


def config_from(from_dict: Callable[[dict[str, Any]], Any], config_file: Path | None, what: str,
                overrides: dict[str, Any]) -> Any:
    """``from_dict`` of the ``--config`` file's fields (none without a file) with ``overrides`` on top; a field
    the config does not take is a one-line UsageError."""
    from refground.errors import UsageError

    base = read_config_file(config_file, what) if config_file is not None else {}
    try:
        return from_dict({**base, **overrides})
    except TypeError as exc:
        raise UsageError(f"{config_file}: {exc}") from None
