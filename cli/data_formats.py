"""`refground data import-refcoco | import-referit | import-flickr30k | export`: real dataset formats."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from refground.cli.apps import data_app
from refground.cli.console import emit, info, out
from refground.cli.options import CacheOpt, DatasetOpt, ForceOpt, JsonOpt
from refground.data.formats import export_flickr30k, export_refer, import_flickr30k, import_refer
from refground.data.formats._common import check_name, file_fingerprint
from refground.data.formats.flickr30k import ANNOTATIONS, SENTENCES, SIDECAR, SPLITS
from refground.data.formats.refer import INSTANCES, check_split_by, refs_filename
from refground.data.model import Dataset
from refground.data.store import dataset_dir, is_complete_with, load_dataset, load_named, save_dataset
from refground.errors import UsageError

RootOpt = Annotated[Path, typer.Option("--root", help="Folder holding the annotation files (layout: see the command "
                                       "description).", show_default=False)]
ImagesOpt = Annotated[Path, typer.Option("--images", help="Folder holding the image files (stored absolute; not "
                                         "copied).", show_default=False)]
NameOpt = Annotated[Optional[str], typer.Option("--dataset", "-d", help="Dataset name in the cache (default: see above).",
                                                show_default=False)]
SkipOpt = Annotated[bool, typer.Option("--skip-invalid", help="Drop empty sentences and annotations with invalid "
                                       "boxes (counted) instead of stopping with an error.")]


def _import(command: str, name: str, cache: Optional[Path], force: bool, as_json: bool, params: dict[str, Any],
            make: Callable[[], Dataset]) -> None:
    """Import unless the cached dataset is complete with the same parameters and input fingerprints."""
    check_name(name, "dataset name")
    directory = dataset_dir(name, cache)
    skipped = False
    ds = None
    if not force and is_complete_with(directory, params):
        info(f"{directory}: complete with the same inputs; skipping (use --force to import again)")
        ds, skipped = load_dataset(directory), True
    if ds is None:
        ds = make()  # raises before anything is written: a failed import leaves no folder behind
        save_dataset(ds, directory, command=command, params=params)
    meta = ds.meta
    result = {"dataset": name, "path": str(directory), "skipped": skipped, "images": ds.num_images,
              "objects": ds.num_objects, "queries": ds.num_queries,
              "expressions": int(len(ds.query_rows("all", "expression"))),
              "captions": int(len(ds.query_rows("all", "caption"))),
              "skipped_sentences": int(meta.get("skipped", 0)), "skipped_objects": int(meta.get("skipped_objects", 0)),
              "skipped_images": int(meta.get("skipped_images", 0)), "clipped_boxes": int(meta.get("clipped", 0)),
              "missing_images": int(meta.get("missing_images", 0))}
    if "latin1_lines" in meta:  # text formats (Flickr30K): how the files were decoded
        result.update({"latin1_files": int(meta["latin1_files"]), "latin1_lines": int(meta["latin1_lines"]),
                       "bom_files": int(meta.get("bom_files", 0))})
    _warn_import(result, meta)
    if as_json:
        emit(result, True)
        return
    dropped = [f"{result[k]} {w}" for k, w in (("skipped_sentences", "sentences"), ("skipped_objects", "objects"),
                                                 ("skipped_images", "images"), ("clipped_boxes", "boxes clipped"))
               if result[k]]
    out().print(f"{'up to date' if skipped else 'imported'} {name}: {ds.num_images} images, {ds.num_objects} objects, "
                f"{ds.num_queries} queries" + (f" ({', '.join(dropped)} dropped/clipped)" if dropped else "")
                + f" -> {directory}", markup=False, highlight=False)


def _warn_import(result: dict[str, Any], meta: dict[str, Any]) -> None:
    """Status lines on stderr for what an import could read but the user should know about."""
    if result["missing_images"]:
        info(f"warning: {result['missing_images']} of {result['images']} image files named by the annotations are "
             f"not under --images {meta.get('image_root')} (first: {meta.get('first_missing_image')}); check "
             "--images, or later steps that read the images will fail")
    if result.get("latin1_lines"):
        info(f"warning: {result['latin1_lines']} line(s) in {result['latin1_files']} file(s) were not UTF-8 and "
             "were read as latin-1")


def _refer_command(command: str, root: Path, dataset: str, split_by: str, images: Path, name: Optional[str],
                   cache: Optional[Path], skip_invalid: bool, force: bool, as_json: bool,
                   allowed: tuple[str, ...]) -> None:
    if dataset not in allowed:
        raise UsageError(f"unknown dataset {dataset!r}; expected one of: {', '.join(allowed)}")
    check_split_by(dataset, split_by)
    root, images = Path(root).resolve(), Path(images).resolve()
    folder = root / dataset
    params = {"root": str(root), "dataset": dataset, "split_by": split_by, "images": str(images),
              "skip_invalid": skip_invalid,
              "inputs": file_fingerprint(folder / refs_filename(split_by), folder / INSTANCES)}
    _import(command, name or f"{dataset}_{split_by}", cache, force, as_json, params,
            lambda: import_refer(root, dataset, split_by, images, name=name or f"{dataset}_{split_by}",
                                 skip_invalid=skip_invalid))


@data_app.command("import-refcoco")
def import_refcoco(
    root: RootOpt,
    images: ImagesOpt,
    dataset: Annotated[str, typer.Option("--corpus", help="refcoco, refcoco+ or refcocog: the folder under "
                                         "--root holding refs(<split-by>).p and instances.json.")] = "refcoco",
    split_by: Annotated[str, typer.Option("--split-by", help="unc (refcoco, refcoco+), umd or google "
                                          "(refcocog).")] = "unc",
    name: NameOpt = None,
    cache: CacheOpt = None,
    skip_invalid: SkipOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Import RefCOCO / RefCOCO+ / RefCOCOg from the refer layout (<root>/<dataset>/refs(<split-by>).p +
    instances.json; --images is the COCO train2014 folder) into cache/<name>/dataset (name default
    <dataset>_<split-by>). Every annotation becomes a candidate object, every sentence a query."""
    _refer_command("data import-refcoco", root, dataset, split_by, images, name, cache, skip_invalid, force, as_json,
                   ("refcoco", "refcoco+", "refcocog"))


@data_app.command("import-referit")
def import_referit(
    root: RootOpt,
    images: ImagesOpt,
    split_by: Annotated[str, typer.Option("--split-by", help="unc or berkeley.")] = "unc",
    name: NameOpt = None,
    cache: CacheOpt = None,
    skip_invalid: SkipOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Import ReferItGame (RefCLEF) from the refer layout (<root>/refclef/refs(<split-by>).p + instances.json;
    --images is the SAIAPR-12 image folder) into cache/<name>/dataset (name default refclef_<split-by>)."""
    _refer_command("data import-referit", root, "refclef", split_by, images, name, cache, skip_invalid, force, as_json,
                   ("refclef",))


@data_app.command("import-flickr30k")
def import_flickr(
    root: RootOpt,
    images: ImagesOpt,
    name: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name in the cache.")] = "flickr30k",
    cache: CacheOpt = None,
    skip_invalid: SkipOpt = False,
    ignore_sidecar: Annotated[bool, typer.Option("--ignore-sidecar", help="Read only the Flickr30K files, even "
                                                 "where a refground.json sidecar lies beside them.")] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Import Flickr30K Entities (<root>/Sentences/, Annotations/, train.txt, val.txt, test.txt; --images is the
    flickr30k-images folder) into cache/<name>/dataset: one caption query per sentence, one mention per phrase.
    Images in no split file are skipped and counted. A refground.json sidecar (written by `data export`) is used
    when present. A re-run skips the import while the split files and folders are unchanged: after editing files
    in place, pass --force."""
    root, images = Path(root).resolve(), Path(images).resolve()
    params = {"root": str(root), "images": str(images), "skip_invalid": skip_invalid, "use_sidecar": not ignore_sidecar,
              "inputs": file_fingerprint(*(root / f"{s}.txt" for s in SPLITS), root / SENTENCES, root / ANNOTATIONS,
                                         root / SIDECAR)}
    _import("data import-flickr30k", name, cache, force, as_json, params,
            lambda: import_flickr30k(root, images, name=name, skip_invalid=skip_invalid,
                                     use_sidecar=not ignore_sidecar))


FORMATS = ("refer", "flickr30k")


ExportForceOpt = Annotated[bool, typer.Option(
    "--force", help="Write into --out-dir even where it holds files no refground export wrote: the files export "
    "writes (refer: <name>/instances.json, <name>/refs(<split-by>).p; flickr30k: Sentences/<id>.txt, "
    "Annotations/<id>.xml, the split files, refground.json; both: the image files) replace those of the same "
    "name, every other file is kept. Without it such an export stops before writing anything. A previous "
    "export is replaced without --force.")]


@data_app.command("export")
def export(
    out_dir: Annotated[Path, typer.Option("--out-dir", "--out", help="Output folder (created; refer: <out>/<name>/ "
                                          "and <out>/images/; flickr30k: Sentences/, Annotations/, split files, "
                                          "flickr30k_images/ and refground.json).", show_default=False)],
    dataset: DatasetOpt = "synth",
    fmt: Annotated[str, typer.Option("--format", help="refer (expressions) or flickr30k (captions).")] = "refer",
    split_by: Annotated[str, typer.Option("--split-by", help="refer only: the splitBy in refs(<split-by>).p.")] = "unc",
    name: Annotated[Optional[str], typer.Option("--corpus", help="refer only: the corpus folder under --out-dir "
                                                "(default: the dataset name).", show_default=False)] = None,
    cache: CacheOpt = None,
    force: ExportForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a cached dataset in a real format, with copies of its image files. What the format cannot
    hold (attributes, kinds, mention roles, relations; masks for Flickr30K) rides along in extra keys / the
    refground.json sidecar, so importing the export gives the same dataset back. Files that no refground
    export wrote are never overwritten without --force, and never deleted."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    ds = load_named(dataset, cache)
    if fmt == "refer":
        summary = export_refer(ds, out_dir, name or dataset, split_by, force=force)
        counts = f"{summary['refs']} refs, {summary['sentences']} sentences"
    else:
        summary = export_flickr30k(ds, out_dir, force=force)
        counts = f"{summary['sentences']} sentences"
    summary["dataset"] = dataset
    if as_json:
        emit(summary, True)
        return
    for note in summary["notes"]:
        info(f"note: {note}")
    out().print(f"exported {dataset} as {fmt}: {summary['images']} images, {summary['objects']} objects, {counts}, "
                f"{summary['images_copied']} image files -> {summary['out']}", markup=False, highlight=False)

