"""The method commands, built from the registry (:mod:`refground.methods`) each time the app is built:
``train <method>``, ``report <method>``, ``pseudo <method>``, and the ``--method`` options of ``eval`` and
``show`` (cli/eval.py, cli/show.py). A method's own options come from its :class:`~refground.methods.Option`
records; nothing here names a method, so a registered method needs no edit under cli/."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from refground.cli.console import check_out_file, emit, info, table
from refground.cli.options import (CacheOpt, ConfigOpt, DatasetOpt, ForceOpt, JsonOpt, OutOpt, ResumeOpt, RunOpt,
                                   ThreadsOpt,
                                   SeedOpt, read_config_file)
from refground.methods import Method, Option, list_methods, method_kwargs
from refground.threads import parse_threads, use_threads

KW = inspect.Parameter.KEYWORD_ONLY


def param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, KW, default=default, annotation=annotation)


def option_param(opt: Option, unset: bool = False) -> inspect.Parameter:
    """The Typer parameter of a method option; ``unset``: default None ("not given", the method's own default
    applies), for options shared by the methods of one command."""
    help_text = opt.help + (f" [{'|'.join(map(str, opt.choices))}]" if opt.choices else "")
    if unset or opt.default is None:
        ann = Annotated[Optional[opt.type], typer.Option(opt.cli_flag, help=help_text, show_default=False)]
        return param(opt.name, ann, None)
    return param(opt.name, Annotated[opt.type, typer.Option(opt.cli_flag, help=help_text)], opt.default)


def command(params: Sequence[inspect.Parameter], body: Callable[..., None], doc: str) -> Callable[..., None]:
    """A function Typer reads like a hand-written command: ``params`` become its options, ``doc`` its help."""
    def run(**kwargs: Any) -> None:
        body(**kwargs)

    run.__signature__ = inspect.Signature(list(params))  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    run.__doc__ = doc
    return run


def union_options(methods: Sequence[Method], attr: str) -> list[Option]:
    """The options of ``attr`` over ``methods``, each name once (one meaning per option name: two methods that
    declare a name with another type or flag are a ValueError)."""
    seen: dict[str, Option] = {}
    for m in methods:
        for opt in getattr(m, attr):
            old = seen.setdefault(opt.name, opt)
            if (old.type, old.cli_flag) != (opt.type, opt.cli_flag):
                raise ValueError(f"option {opt.cli_flag} means two things: {old} and {opt}")
    return list(seen.values())


def with_method_options(body: Callable[..., None], action: str) -> Callable[..., None]:
    """A command of ``body``'s own options (all but its trailing ``**options``) plus the ``<action>_options`` of
    every registered method that has ``action``, unset by default (``eval --method``, ``show --method``)."""
    params = list(inspect.signature(body, eval_str=True).parameters.values())[:-1]
    params += [option_param(o, unset=True) for o in union_options(list_methods(action), f"{action}_options")]
    return command(params, body, body.__doc__ or "")


def render(tables: Sequence[Any]) -> list[Any]:
    return [table(t.title, t.columns, t.rows, t.kinds) for t in tables]


def method_help(methods: Sequence[Method]) -> str:
    return ", ".join(m.name for m in methods) or "none registered"


# ------------------------------------------------------------------------------------------------- train
@contextlib.contextmanager
def training_processes() -> Iterator[bool]:
    """A train command's block under torchrun: the process group of its environment
    (:func:`refground.distributed.from_env`; nothing without one) for the block, and on every rank but 0 no
    progress bars and no library warnings (rank 0 prints them; errors still show). Yields whether this
    process prints the results (rank 0, or the only process)."""
    import logging

    from refground import distributed, progress

    with distributed.from_env():
        main = distributed.is_main()
        log = logging.getLogger("refground")
        level = log.level
        if not main:
            progress.set_tracker(None)
            log.setLevel(logging.ERROR)
        try:
            yield main
        finally:
            log.setLevel(level)


def train_command(m: Method) -> Callable[..., None]:
    common = [param("dataset", DatasetOpt, "synth"), param("cache", CacheOpt, None), param("run", RunOpt, None)]
    if m.variants:
        common.append(param("variant", Annotated[Optional[str], typer.Option(
            "--variant", help=f"The paper's ablation row: {', '.join(m.variants)}.", show_default=False)], None))
    common += [
        param("config_file", ConfigOpt, None),
        param("epochs", Annotated[Optional[int], typer.Option("--epochs", help="Training epochs.",
                                                              show_default=False)], None),
        param("batch_size", Annotated[Optional[int], typer.Option("--batch-size", help="Queries per step.",
                                                                  show_default=False)], None),
        param("lr", Annotated[Optional[float], typer.Option("--lr", help="Learning rate.", show_default=False)], None),
    ]
    tail = [param("seed", SeedOpt, 0), param("threads", ThreadsOpt, "auto"), param("resume", ResumeOpt, True),
            param("force", ForceOpt, False), param("as_json", JsonOpt, False)]

    def body(dataset: str, cache: Path | None, run: str | None, config_file: Path | None, epochs: int | None,
             batch_size: int | None, lr: float | None, seed: int, threads: str, resume: bool, force: bool,
             as_json: bool, variant: str | None = None, **options: Any) -> None:
        from refground.errors import UsageError
        from refground.runs import local_run_name
        from refground.train import check_training_fields

        if variant is not None and variant not in m.variants:
            raise UsageError(f"--variant {variant!r}: expected one of: {', '.join(m.variants)}")
        options = method_kwargs(m, "train_options", options)
        if run is not None:  # training writes only this dataset's runs: NAME, or DATASET/NAME of this dataset
            run = local_run_name(run, m.name, dataset)
        overrides = check_training_fields(epochs=epochs, batch_size=batch_size, lr=lr)
        config = read_config_file(config_file, f"{m.name} config") if config_file is not None else None
        with training_processes() as main, use_threads(parse_threads(threads)):
            result = m.train(dataset, cache, run, variant=variant, config=config, overrides=overrides, seed=seed,
                             resume=resume, force=force, **options)
        if not main:
            return
        if result.get("cache_hit"):
            info(f"{result['run']}: complete with the same config, seed and inputs; cache hit, skipping "
                 "(use --force to retrain)")
        elif result.get("resumed_from"):
            info(f"{result['run']}: resumed after epoch {result['resumed_from']}")
        tables = render(m.train_tables(result)) if m.train_tables else []
        emit({"dataset": dataset, **{k: v for k, v in result.items() if k != "curve"}}, as_json, tables)

    doc = (f"{m.summary}\n\nTrains on the train split, keeps the best epoch on val, and writes the run folder "
           f"<cache>/<dataset>/runs/{m.name}/<run>/ (config.json, checkpoint.pt, model.pt, curve.json, "
           "metrics.json); a complete run with the same config, seed and inputs is a cache hit, a complete run with "
           "others is refused (--force retrains it in place; or choose another --run), an interrupted one resumes "
           "(bit-identical to an uninterrupted run). One process at a time trains a run folder. Under "
           f"`torchrun --nproc-per-node N --no-python -- refground train {m.name} ...` the N processes train it "
           "together (DistributedDataParallel; rank 0 writes and prints). "
           f"Paper: {m.paper}.")
    return command([*common, *(option_param(o) for o in m.train_options), *tail], body, doc)


# ------------------------------------------------------------------------------------------------ report
def report_command(m: Method) -> Callable[..., None]:
    def body(dataset: str, cache: Path | None, out: Path | None, threads: str, as_json: bool, **options: Any) -> None:
        if out is not None:  # markdown only, and never over a file of another kind (a model.pt, say)
            check_out_file(out, ours=lambda p: p.suffix.lower() == ".md", suffixes=(".md",))
        with use_threads(parse_threads(threads)):
            res = m.report(dataset, cache, out, **method_kwargs(m, "report_options", options))
        emit(res["json"], as_json, render(res["tables"]), Path(res["markdown_path"]).with_suffix(".json"))

    params = [param("dataset", DatasetOpt, "synth"), param("cache", CacheOpt, None), param("out", OutOpt, None),
              *(option_param(o) for o in m.report_options), param("threads", ThreadsOpt, "auto"),
              param("as_json", JsonOpt, False)]
    return command(params, body, f"{m.name}'s tables on a dataset (markdown to --out, the figures as JSON beside "
                   f"it, PNGs where it has them). Paper: {m.paper}.")


# ------------------------------------------------------------------------------------------------ pseudo
def pseudo_command(m: Method) -> Callable[..., None]:
    def body(dataset: str, cache: Path | None, seed: int, force: bool, threads: str, as_json: bool,
             **options: Any) -> None:
        with use_threads(parse_threads(threads)):
            res = m.pseudo(dataset, cache, seed=seed, force=force, **method_kwargs(m, "pseudo_options", options))
        if res.get("status") == "hit":
            info(f"{res['path']}: complete and current; skipping (use --force to rebuild)")
        if res.get("note"):
            info(res["note"])
        emit(res["json"], as_json, render(res["tables"]), Path(res["path"]).with_suffix(".json"))

    params = [param("dataset", DatasetOpt, "synth"), param("cache", CacheOpt, None),
              *(option_param(o) for o in m.pseudo_options), param("force", ForceOpt, False), param("seed", SeedOpt, 0),
              param("threads", ThreadsOpt, "auto"), param("as_json", JsonOpt, False)]
    return command(params, body, f"{m.name}'s pseudo ground truth, with its precision and recall. "
                   f"Paper: {m.paper}.")


def method_groups() -> dict[str, typer.Typer]:
    """The ``train``, ``report`` and ``pseudo`` groups with a command per registered method (``train`` also
    gets ``detector`` and ``clip``: the built-in models are no methods but train through the same loop)."""
    from refground.cli.report_clip import report_clip_command
    from refground.cli.report_supervision import report_supervision_command
    from refground.cli.train_clip import train_clip_command
    from refground.cli.train_detector import train_detector_command

    train = typer.Typer(help="Train a model: the built-in detector or CLIP, or a method: "
                        f"{method_help(list_methods('train'))}.", no_args_is_help=True)
    train.command("detector")(train_detector_command)
    train.command("clip")(train_clip_command)
    report = typer.Typer(help=f"A method's tables: {method_help(list_methods('report'))}; clip: the built-in "
                         "CLIP's zero-shot figures; supervision: the methods side by side by supervision level.",
                         no_args_is_help=True)
    report.command("clip")(report_clip_command)
    report.command("supervision")(report_supervision_command)
    pseudo = typer.Typer(help=f"A method's pseudo ground truth: {method_help(list_methods('pseudo'))}.",
                         no_args_is_help=True)
    for m in list_methods():
        if m.train:
            train.command(m.name)(train_command(m))
        if m.report and m.name not in ("clip", "supervision"):  # the built-in reports keep their names
            report.command(m.name)(report_command(m))
        if m.pseudo:
            pseudo.command(m.name)(pseudo_command(m))
    return {"train": train, "report": report, "pseudo": pseudo}
