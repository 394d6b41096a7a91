"""Entry point: ``refground`` = :func:`main`. Turns known errors into one line and a non-zero exit."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator

import click
import typer

from refground import __version__
from refground.cli.apps import APP_SETTINGS, app
from refground.cli.console import err, install_progress, library_warnings
from refground.errors import RefgroundError

# Typer >= 0.29 vendors its own click; catch both its exceptions and plain click's (older Typer).
_EXIT = tuple({typer.Exit, click.exceptions.Exit})
_ABORT = tuple({typer.Abort, click.exceptions.Abort})
_USAGE = tuple({getattr(typer, "TyperException", click.ClickException), click.ClickException})

# Command modules register themselves on the apps when imported.
from refground.cli import bench as _bench  # noqa: F401,E402
from refground.cli import cache as _cache  # noqa: F401,E402
from refground.cli import data_formats as _data_formats  # noqa: F401,E402
from refground.cli import data_synth as _data_synth  # noqa: F401,E402
from refground.cli import data_view as _data_view  # noqa: F401,E402
from refground.cli import extract as _extract  # noqa: F401,E402
from refground.cli import graph as _graph  # noqa: F401,E402
from refground.cli import quickstart as _quickstart  # noqa: F401,E402
from refground.cli import retrieve as _retrieve  # noqa: F401,E402
from refground.cli import vlnms as _vlnms  # noqa: F401,E402


@app.command("version")
def version() -> None:
    """Print the library version."""
    print(__version__)


def build_app() -> typer.Typer:
    """The whole CLI: the static commands and groups, and the method commands built from the registry now
    (``train <method>``, ``report <method>``, ``pseudo <method>``, ``eval --method``, ``show --method``)."""
    from refground.cli.eval import eval_command
    from refground.cli.methods import method_groups
    from refground.cli.show import show_command

    root = typer.Typer(**APP_SETTINGS)
    root.registered_commands = list(app.registered_commands)
    root.registered_groups = list(app.registered_groups)
    root.command("eval")(eval_command())
    root.command("show")(show_command())
    for name, group in method_groups().items():
        root.add_typer(group, name=name)
    return root


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so it unwinds like Ctrl-C: staging folders and temporary files
    are removed and the writer's locks released (a plain SIGTERM would kill the process where it stands)."""


def _default_sigterm_in_child() -> None:
    """A forked worker (``data synth``'s pool) must die on SIGTERM as before, not unwind the parent's command:
    it gets the default action back (the forking thread is the child's main thread, so this may set it)."""
    if getattr(signal.getsignal(signal.SIGTERM), "__qualname__", "").startswith(_sigterm_unwinds.__qualname__):
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except ValueError:
            pass


os.register_at_fork(after_in_child=_default_sigterm_in_child)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[list[bool]]:
    """While the block runs, SIGTERM raises :class:`Terminated` (main thread only; the previous handler is
    put back after). Yields a one-item list that turns True once SIGTERM arrived."""
    seen = [False]
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def handler(signum, frame):
        seen[0] = True
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); returns the exit code (130 after Ctrl-C, 143 after
    SIGTERM: both unwind, so nothing half-written is left behind).

    ``--debug`` may stand anywhere on the command line (or set REFGROUND_DEBUG=1): errors then show the
    traceback. Without it, a user error is one line ``error: ...`` with exit code 2, an unexpected
    failure one line with exit code 1.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("REFGROUND_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    install_progress()
    with _sigterm_unwinds() as terminated, library_warnings():
        code = _run(args, debug)
    if terminated[0]:
        err.print("terminated")
        return 143
    if code == 130:
        err.print("interrupted")
    return code


def _run(args: list[str], debug: bool) -> int:
    try:
        # Outside standalone mode Typer returns the code of an Exit (and maps Ctrl-C to Exit(130))
        # instead of raising it; our commands themselves return None.
        code = build_app()(args=args, prog_name="refground", standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code != 0:
            return code
    except _EXIT as exc:
        return int(exc.exit_code)
    except _ABORT:
        return 130
    except _USAGE as exc:
        exc.show()
        return int(exc.exit_code)
    except RefgroundError as exc:
        if getattr(exc, "quiet", False):  # another process (rank 0 under torchrun) reported it already
            return exc.exit_code
        if debug:
            traceback.print_exc()
        err.print(f"error: {exc}", markup=False)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: say so in one line unless debugging
        if debug:
            traceback.print_exc()
        err.print(f"error: internal error: {type(exc).__name__}: {exc} (re-run with --debug for the traceback)",
                  markup=False)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
