"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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
RunOpt = Annotated[Optional[str], typer.Option("--run", help="Run: NAME (the folder <cache>/<dataset>/runs/<method>/NAME/; "
                                               "default: the method's, e.g. its variant), DATASET/NAME (another "
                                               "dataset's run, applied as trained) or a run folder path (./x, /x). "
                                               "train writes only this dataset's runs.", show_default=False)]
ThreadsOpt = Annotated[str, typer.Option(
    "--threads", help="Torch intra-op threads: auto (the cores this process may use that are idle when the step "
    "starts, at least 1; under torchrun or with OMP_NUM_THREADS set, theirs) or a count. Training weights depend "
    "on it (the run's manifest records it): give a count to reproduce a run byte for byte.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="JSON file of config fields (e.g. a run's "
                                                   "config.json); the options given override it.",
                                                   show_default=False)]


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
