"""The method registry: one :class:`Method` record per published method, one package per method.

A method lives in ``refground/methods/<name>/`` (``model.py`` the paper's modules, ``run.py`` training and
prediction on the cache, ``report.py`` / ``figures.py`` / ``pseudo.py`` where it has them) and its
``__init__.py`` defines ``METHOD``, a :class:`Method` whose callables import the heavy modules only when
called (so ``refground --help`` never loads torch). The CLI is built from this registry: ``refground train
<method>``, ``eval --method``, ``show --method``, ``report <method>`` and ``pseudo <method>`` list and dispatch
whatever is registered, and render each method's own options (:class:`Option`). Adding a method is a folder
plus its name in :data:`BUILTIN` (or :func:`register` at run time, as the tests do).

Contracts of the callables (``dataset`` the cache dataset name, ``cache`` the cache root or None, options as
keyword arguments named like the method's :class:`Option` records):

* ``train(dataset, cache, run, *, variant, fields, seed, resume, force, **options) -> dict``: train the run
  (``run`` None: the method's default name); ``fields`` are config fields (from ``--config`` and the common
  ``--epochs/--batch-size/--lr``). Returns the summary (``run``, ``name``, ``cache_hit``, ``metrics``, ...).
* ``train_tables(summary) -> list[TableData]``: what ``refground train`` prints.
* ``predict(dataset, cache, run, jobs, *, force) -> list[dict]``: ``jobs`` = ``[(split, options)]``; writes (or
  finds current) a predictions file per job (:mod:`refground.eval.predictions`), returns ``{"path", "split",
  "status", ...}`` per job in order.
* ``show(dataset, cache, run, query_id, out, **options) -> dict``: writes a PNG of the method's own maps,
  returns ``{"path", "message"}``.
* ``report(dataset, cache, out, **options) -> dict``: writes the method's tables (markdown, JSON, PNGs),
  returns ``{"markdown_path", "tables": [TableData], "json": dict}``.
* ``pseudo(dataset, cache, *, seed, force, **options) -> dict``: writes its pseudo ground truth, returns
  ``{"path", "status", "tables": [TableData], "json": dict, "note"?}``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from refground.errors import UsageError

TASKS = ("comprehension", "phrase grounding", "segmentation", "proposals")
# packages under refground/methods/, loaded on first use of the registry
BUILTIN = ("cmrin", "vlnms", "lts", "reir", "bicm")


@dataclass(frozen=True)
class Option:
    """A method's own command-line option: ``--<name with dashes>`` (or ``flag``, e.g. ``--pseudo/--no-pseudo``),
    of ``type`` (int, float, str, bool or pathlib.Path), ``default`` (None: not given), ``help``, and
    ``choices`` that the CLI checks before calling the method."""

    name: str
    type: type
    default: Any = None
    help: str = ""
    flag: str | None = None
    choices: tuple[Any, ...] = ()

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Method:
    """What the toolkit knows of a method: its name, paper, task, the paper's ablation rows (``variants``) and
    the callables it has, each with its own options (see the module docstring for their contracts)."""

    name: str
    paper: str
    task: str
    summary: str
    variants: tuple[str, ...] = ()
    train: Callable[..., dict[str, Any]] | None = None
    train_options: tuple[Option, ...] = ()
    train_tables: Callable[[dict[str, Any]], list[Any]] | None = None
    predict: Callable[..., list[dict[str, Any]]] | None = None
    predict_options: tuple[Option, ...] = ()
    show: Callable[..., dict[str, Any]] | None = None
    show_options: tuple[Option, ...] = ()
    report: Callable[..., dict[str, Any]] | None = None
    report_options: tuple[Option, ...] = ()
    pseudo: Callable[..., dict[str, Any]] | None = None
    pseudo_options: tuple[Option, ...] = ()

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"method {self.name!r}: task {self.task!r} is not one of {', '.join(TASKS)}")

    def has(self, action: str) -> bool:
        """Whether the method has ``action`` (train, predict, show, report or pseudo)."""
        return getattr(self, action) is not None


_REGISTRY: dict[str, Method] = {}
_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN:
        register(importlib.import_module(f"refground.methods.{name}").METHOD)


def register(method: Method, replace: bool = False) -> Method:
    """Add ``method`` to the registry (a second method of the same name is a ValueError unless ``replace``)."""
    if method.name in _REGISTRY and not replace and _REGISTRY[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method added with :func:`register` (tests register toy methods and take them out again)."""
    _REGISTRY.pop(name, None)


def list_methods(action: str | None = None) -> list[Method]:
    """The registered methods in registration order; with ``action``, those that have it."""
    _load_builtin()
    return [m for m in _REGISTRY.values() if action is None or m.has(action)]


def get_method(name: str, action: str | None = None) -> Method:
    """The method ``name``; an unknown name, or one without ``action``, is a one-line UsageError listing the
    methods that qualify."""
    _load_builtin()
    method = _REGISTRY.get(name)
    if method is None or (action is not None and not method.has(action)):
        names = ", ".join(m.name for m in list_methods(action)) or "none"
        what = "unknown method" if method is None else f"method without {action}"
        raise UsageError(f"--method {name!r}: {what}; expected one of: {names}")
    return method


def check_choice(opt: Option, value: Any) -> None:
    """A one-line UsageError when ``value`` is not among ``opt``'s choices (no choices: anything goes)."""
    if opt.choices and value is not None and value not in opt.choices:
        raise UsageError(f"{opt.cli_flag} {value!r}: expected one of: {', '.join(map(str, opt.choices))}")


def method_kwargs(method: Method | None, attr: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options of ``given`` (None: not given) that ``method`` takes for ``attr`` (``predict_options``, ...),
    checked against their choices; one it does not take, or any given without a method (``method`` None), is a
    one-line UsageError. The commands (cli/) and the reports that call a method (``report supervision``) check
    options here."""
    own = {o.name: o for o in getattr(method, attr)} if method is not None else {}
    out = {}
    for name, value in given.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if method is None:
            raise UsageError(f"{flag} applies only with --method")
        if name not in own:
            raise UsageError(f"{flag} does not apply to --method {method.name}")
        check_choice(own[name], value)
        out[name] = value
    return out


def train_command(method: str, dataset: str, name: str, variants: tuple[str, ...] = ()) -> str:
    """The command that trains run ``name`` of ``method`` (a name among ``variants`` trains that variant), for the
    reports' "not trained" rows."""
    flag = f" --dataset {dataset}" if dataset != "synth" else ""
    if name in variants:
        return f"refground train {method}{flag} --variant {name}"
    return f"refground train {method}{flag} --run {name}"


__all__ = ["BUILTIN", "Method", "Option", "TASKS", "check_choice", "get_method", "list_methods", "method_kwargs",
           "register", "train_command", "unregister"]
