"""BiCM as a pipeline step: module scores per split, the class-name baseline, KAM training, predictions.

Inputs (all made by earlier steps, none holding a benchmark box): the detector's proposals
``features/<features>.h5`` (default ``detector-default``, its top ``top_n`` = 100 per image with class names) and
the CLIP artifact ``clip/<model>.h5`` made from those proposals (`refground extract --clip builtin`), whose
manifest names the CLIP model folder that QAM runs.

* :func:`split_scores`: the training-free modules on every query of a split (expressions, or caption phrases),
  cached as ``<cache>/<dataset>/bicm/<clip model>/<split>-<kind>.h5`` with a manifest (Thr_a and top_n in its
  fingerprint): every ablation row reads it, so a report costs one pass per split.
* :func:`class_name_scores`: the baseline of Wang and Specia [25]: each proposal scored by its detector class
  name's similarity to the query's words in a word-vector space (the toolkit's own vectors of the dataset's
  sentences, read without any mention-object link), max over the query's words.
* :func:`train_bicm`: KAM's MLP on the pseudo labels of `refground pseudo bicm` (Adam, 1e-4, 50 epochs, the last
  epoch kept: with unpaired data there is no truth to select an epoch by; the curve logs the MLP's agreement
  with a held-out tenth of the pseudo labels).
* :func:`predict_bicm_many`: one predictions file per split, ``{"query_id", "box"}`` per expression and
  ``{"query_id", "mention", "box"}`` per caption phrase, that `refground eval` scores (Precision@1 per kind;
  phrase Acc and PointIt). Run names: the variants (``class-name``, ``qam``, ``com``, ..., ``qam-com-sf``: nothing
  to train) and trained runs (``bicm``). Box rules: ``--box-rule`` for expressions (default ``largest``, the
  paper's) and ``--phrase-box-rule`` (default ``union``).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refground.cache import parent, require, write_manifest
from refground.data.store import dataset_dir, image_path, load_dataset
from refground.errors import ArtifactError, UsageError
from refground.methods.bicm.data import QUERY_KINDS, DetectorProposals, eval_pairs
from refground.methods.bicm.model import (
    CLASS_NAME,
    TRAINED,
    VARIANT_MODULES,
    BiCMConfig,
    KnowledgeAdaptation,
    choose_boxes,
    fused_score,
    kam_loss,
    variant_config,
)
from refground.methods.bicm.modules import (
    ClipInputs,
    ModuleScores,
    candidates,
    class_embeddings,
    compute_scores,
    kam_inputs,
)
from refground.runs import local_run_name, resolve_run
from refground.train import MODEL_FILE, LoadedRun, RunSpec, complete_run, config_params, fit, load_run_folder

MODULES_STEP = "bicm.modules@1"
PREDICT_STEP = "predict.bicm@1"
TRAIN_STEP = "train.bicm@1"
DEFAULT_FEATURES = "detector-default"
EVAL_BATCH = 256


def run_dir(dataset: str, cache: Any, name: str) -> Path:
    """``<cache>/<dataset>/runs/bicm/<name>``."""
    return dataset_dir(dataset, cache).parent / "runs" / "bicm" / local_run_name(name, "bicm", dataset)


def features_path(dataset: str, cache: Any, features: str) -> Path:
    """``<cache>/<dataset>/features/<features>.h5``, complete and current (else a one-line error naming the step)."""
    path = dataset_dir(dataset, cache).parent / "features" / f"{features}.h5"
    if not path.exists():
        raise ArtifactError(f"{path}: no proposals; run `refground extract --clip builtin` (BiCM reads the detector's "
                            f"proposals, features/{features}.h5, and their CLIP embeddings)")
    require(path, "refground extract", check_parents=True)
    return path


def clip_path(dataset: str, cache: Any, clip: str | None, f_path: Path) -> Path:
    """The CLIP artifact to read (``clip`` its name, None: the only one), which must be complete, current, and made
    from the proposals of ``f_path``."""
    from refground.retrieval.store import clip_artifact

    path = clip_artifact(dataset, cache, clip)
    m = require(path, "refground extract --clip builtin", check_parents=True)
    fp = m.parents.get("features")
    if fp is None or Path(fp.path).resolve() != f_path.resolve():
        raise ArtifactError(f"{path}: its proposal crops are not those of {f_path.name}; run `refground extract "
                            f"--features {f_path.stem} --clip ...` (BiCM scores the crops of the proposals it ranks)")
    return path


def clip_model_folder(c_path: Path) -> Path:
    """The CLIP model folder the artifact ``c_path`` was made with (its manifest's ``clip`` parent: a built-in run's
    ``pretrained/`` folder, or the ``hf:PATH`` folder)."""
    from refground.cache import read_manifest_of
    from refground.features.clip_train import PRETRAINED_DIR

    m = read_manifest_of(c_path)
    src = m.parents.get("clip") if m else None
    if src is None:
        raise ArtifactError(f"{c_path}: its manifest names no CLIP model; run `refground extract --clip ... --force`")
    folder = Path(src.path)
    if (folder / PRETRAINED_DIR / "config.json").is_file():
        folder = folder / PRETRAINED_DIR
    if not (folder / "config.json").is_file():
        raise ArtifactError(f"{c_path}: its CLIP model {folder} is gone; train it again (`refground train clip`) or "
                            "extract with another --clip")
    return folder


class Inputs:
    """Everything BiCM reads for a dataset: the dataset (queries' texts and images; evaluation code alone reads its
    boxes), the detector's top ``top_n`` proposals, the CLIP artifact's embeddings and the CLIP model (loaded on
    first use)."""

    def __init__(self, dataset: str, cache: Any, features: str = DEFAULT_FEATURES, clip: str | None = None,
                 top_n: int = 100, min_score: float = 0.2, min_boxes: int = 10) -> None:
        self.dataset, self.cache, self.features, self.top_n = dataset, cache, features, int(top_n)
        self.min_score, self.min_boxes = float(min_score), int(min_boxes)
        self.ds_dir = dataset_dir(dataset, cache)
        self.f_path = features_path(dataset, cache, features)
        self.c_path = clip_path(dataset, cache, clip, self.f_path)
        self.clip_name = self.c_path.stem
        self.model_folder = clip_model_folder(self.c_path)
        self.ds = load_dataset(self.ds_dir)
        self.props = DetectorProposals.read(self.f_path, self.ds, self.top_n, self.min_score, self.min_boxes)
        self._clip: ClipInputs | None = None

    def parents(self) -> dict[str, Any]:
        return {"dataset": parent("dataset", self.ds_dir), "features": parent("artifact", self.f_path),
                "clip": parent("artifact", self.c_path)}

    @property
    def clip(self) -> ClipInputs:
        if self._clip is None:
            import h5py

            from refground.features.hf import HFClip

            model = HFClip(self.model_folder, batch_size=64)
            with h5py.File(self.c_path, "r") as f:
                crops = f["proposals/embedding"][()]
                ids = f["images/ids"][()]
                images = f["images/embedding"][()]
                crop = json.loads(f.attrs.get("crop", "{}") or "{}")
            if not np.array_equal(ids, self.ds.image_ids):
                raise ArtifactError(f"{self.c_path}: its images differ from the dataset's; run `refground extract "
                                    "--clip ... --force`")
            if len(self.props.crop_rows) and int(self.props.crop_rows.max()) >= len(crops):
                raise ArtifactError(f"{self.c_path}: fewer proposal crops than {self.f_path.name} has proposals")
            self._clip = ClipInputs(model, crops, images, class_embeddings(model, self.props.class_names), crop)
        return self._clip

    def image(self, row: int) -> np.ndarray:
        from refground.features.base import read_image

        return read_image(image_path(self.ds, int(self.ds.image_ids[row])))

    def row_of_image(self) -> dict[int, int]:
        return {int(i): r for r, i in enumerate(self.ds.image_ids.tolist())}


# ------------------------------------------------------------------------------------------ eval pairs


def modules_path(inp: Inputs, split: str, kind: str) -> Path:
    """``<cache>/<dataset>/bicm/<clip model>/<split>-<kind>.h5``."""
    return inp.ds_dir.parent / "bicm" / inp.clip_name / f"{split}-{kind}.h5"


def split_scores(inp: Inputs, split: str, kind: str, thr_a: float = 0.7, force: bool = False
                 ) -> tuple[ModuleScores, np.ndarray, np.ndarray]:
    """The module scores of every query of ``split`` (:func:`eval_pairs`), computed once and cached with a
    manifest (a current copy is read back). Returns (scores, query ids, mention indices)."""
    from refground.cache.lock import claim_current
    from refground.cache.manifest import parent_fingerprints

    rows, texts, qids, mentions = eval_pairs(inp.ds, split, kind)
    if not len(rows):
        raise UsageError(f"dataset {inp.dataset}: no {kind} queries in split {split!r}")
    path = modules_path(inp, split, kind)
    params = {"split": split, "kind": kind, "thr_a": float(thr_a), "top_n": inp.top_n, "min_score": inp.min_score,
              "min_boxes": inp.min_boxes, "features": inp.features}
    parents = inp.parents()
    with contextlib.ExitStack() as locks:
        path.parent.mkdir(parents=True, exist_ok=True)
        ((fp, hit),) = claim_current(locks, [(path, params)], MODULES_STEP, parent_fingerprints(parents), force)
        if hit is not None:
            ms = ModuleScores.load(path)
            if len(ms) == len(rows):
                return ms, qids, mentions
        t0 = time.perf_counter()
        ms = compute_scores(inp.clip, inp.image, inp.props, rows, texts, thr_a, f"bicm modules {split} {kind}")
        seconds = time.perf_counter() - t0
        ms.save(path)
        write_manifest(path, step=MODULES_STEP, params=params, parents=parents, fingerprint=fp, kind="bicm",
                       extra={"pairs": len(rows), "seconds": round(seconds, 3),
                              "ms_per_query": round(1000 * seconds / len(rows), 3)})
    return ms, qids, mentions


# -------------------------------------------------------------------------------------------- baseline


def class_name_scores(inp: Inputs, ms: ModuleScores, texts: list[str]) -> torch.Tensor:
    """Wang and Specia's [25] score of every proposal: cosine of its detector class name's word vector and the
    closest word of the query (the toolkit's word vectors of the dataset's sentences, ``grounded_weight`` 0: no
    mention-object link is read). Tensor[Q, N] (padding 0)."""
    from refground.text.wordvec import toolkit_vectors

    vectors = toolkit_vectors(inp.ds, grounded_weight=0.0)
    names = [n.lower() for n in inp.props.class_names]
    dim = vectors.matrix.shape[1]
    cls = np.stack([vectors.matrix[vectors.index[n]] if n in vectors else np.zeros(dim) for n in names])
    cls = cls / np.maximum(np.linalg.norm(cls, axis=1, keepdims=True), 1e-12)
    uniq = sorted(set(texts))
    sims = np.zeros((len(uniq), len(names)), np.float32)
    for k, t in enumerate(uniq):
        words = [w for w in t.lower().split(" ") if w in vectors]
        if words:
            w = np.stack([vectors.matrix[vectors.index[x]] for x in words])
            w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
            sims[k] = (w @ cls.T).max(0)
    at = {t: k for k, t in enumerate(uniq)}
    per_query = torch.from_numpy(sims[[at[t] for t in texts]])  # [Q, C]
    labels = torch.from_numpy(inp.props.labels[ms["prop_rows"]])
    return torch.gather(per_query, 1, labels) * torch.from_numpy(ms["valid"])


# --------------------------------------------------------------------------------------------- scoring


def kam_scores(model: KnowledgeAdaptation, ms: ModuleScores, inp: Inputs, cand: dict[str, torch.Tensor],
               qam: str) -> torch.Tensor:
    """``S^KAM`` (sigmoid) of every candidate, Tensor[Q, N(+1)] (padding 0); model in eval mode."""
    model.eval()
    out = torch.zeros(cand["valid"].shape)
    with torch.no_grad():
        for a in range(0, len(ms), EVAL_BATCH):
            idx = np.arange(a, min(len(ms), a + EVAL_BATCH))
            sub = {k: (v[idx] if v.ndim else v) for k, v in cand.items()}
            fi, fp, fc, fq = kam_inputs(ms.subset(idx), inp.clip, inp.props, sub, qam)
            valid = sub["valid"]
            s = model.score(fi[valid], fp[valid], fc[valid], fq[valid])
            block = torch.zeros(valid.shape)
            block[valid] = s
            out[idx] = block
    return out


def _whole_image_fallback(inp: Inputs, ms: ModuleScores, cand: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An image without a single proposal (a detector with a high threshold) still gets an answer: its first slot
    becomes the whole image, so every query has a candidate."""
    empty = ~cand["valid"].any(1)
    if bool(empty.any()):
        rows = torch.from_numpy(ms["image_rows"])[empty]
        w = torch.from_numpy(inp.ds.image_width[rows.numpy()].astype(np.float32))
        h = torch.from_numpy(inp.ds.image_height[rows.numpy()].astype(np.float32))
        cand["boxes"] = cand["boxes"].clone()
        cand["valid"] = cand["valid"].clone()
        cand["boxes"][empty, 0] = torch.stack([torch.zeros_like(w), torch.zeros_like(h), w, h], 1)
        cand["valid"][empty, 0] = True
    return cand


def predict_boxes(inp: Inputs, ms: ModuleScores, texts: list[str], variant: str, cfg: BiCMConfig | None,
                  rule: str, kam: KnowledgeAdaptation | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The box of every pair under an ablation row (``variant``, with ``cfg`` its config; ``class-name`` the
    baseline) and box ``rule``. Returns (Tensor[Q, 4], the candidates with their final ``score``)."""
    if variant == CLASS_NAME:
        cand = _whole_image_fallback(inp, ms, candidates(ms, BiCMConfig(qam="none", sf=False, kam=False), inp.props))
        cand["score"] = class_name_scores(inp, ms, texts)
        return choose_boxes(cand["score"], cand["boxes"], cand["valid"], rule), cand
    assert cfg is not None
    cand = _whole_image_fallback(inp, ms, candidates(ms, cfg, inp.props))
    if cfg.com == "none":  # QAM alone (Table 4's first row): P_t is the answer
        cand["score"] = torch.zeros(cand["valid"].shape).index_fill_(1, cand["pt_index"].view(1), 1.0)
        return torch.from_numpy(ms[f"pt_box_{cfg.qam}"]), cand
    s_kam = kam_scores(kam, ms, inp, cand, cfg.qam) if cfg.kam and kam is not None else None
    if cfg.kam and s_kam is None:
        raise UsageError("this BiCM config has KAM but no trained model was given")
    cand["score"] = fused_score(cand["s_pq"], cand["s_cq"], cand["s_td"], cfg, s_kam)
    if s_kam is not None:
        cand["s_kam"] = s_kam
    return choose_boxes(cand["score"], cand["boxes"], cand["valid"], rule), cand


# ----------------------------------------------------------------------------------------------- KAM


def load_run(path: Path) -> LoadedRun:
    """Load a complete BiCM run folder (KAM's MLP and its config)."""
    def build(cfg: BiCMConfig) -> KnowledgeAdaptation:
        return KnowledgeAdaptation(cfg.embed_dim, cfg.hidden)

    return load_run_folder(path, "bicm", BiCMConfig.from_dict, build)


def train_bicm(dataset: str, cache: Any = None, name: str = "bicm", config: BiCMConfig | None = None,
               features: str = DEFAULT_FEATURES, clip: str | None = None, seed: int = 0, resume: bool = True,
               force: bool = False) -> dict[str, Any]:
    """Train KAM's MLP on the pseudo labels of `refground pseudo bicm` into run ``name``.

    Each pseudo label is an (image, query text) pair found without pairing data and the index of its box among the
    pair's candidates (proposals + P_t); the loss is [10]'s softmax cross-entropy over the candidates. The last
    epoch is kept. Skips a complete run with the same fingerprint unless ``force``; resumes after the last epoch.
    Returns the run summary (``run``, ``cache_hit``, ``metrics``: pseudo labels used, held-out agreement)."""
    from refground.methods.bicm.pseudo import load_pseudo, pseudo_path

    t_start = time.perf_counter()
    config = config or variant_config("bicm")
    if not config.kam:
        raise UsageError("only configs with KAM have something to train (the other rows: `refground eval --method "
                         "bicm --run <variant>`)")
    if local_run_name(name, "bicm", dataset) in set(VARIANT_MODULES) - set(TRAINED) | {CLASS_NAME}:
        raise UsageError(f"--run {name} is a training-free row; `refground eval --method bicm --run {name}` scores it")
    inp = Inputs(dataset, cache, features, clip, config.top_n, config.min_score, config.min_boxes)
    p_path = pseudo_path(dataset, cache)
    if not p_path.exists():
        raise ArtifactError(f"{p_path}: no pseudo labels; run `refground pseudo bicm`")
    require(p_path, "refground pseudo bicm --force", check_parents=True)
    out = run_dir(dataset, cache, name)
    params = {"config": config_params(config.to_dict(), ("embed_dim",)), "seed": int(seed), "features": features,
              "clip": inp.clip_name}
    spec = RunSpec(out, TRAIN_STEP, params, {**inp.parents(), "pseudo": parent("artifact", p_path)}, kind="runs/bicm")
    with spec.lock():
        result = spec.start(name, force, t_start)
        if result["cache_hit"]:
            return result
        pl = load_pseudo(p_path)
        made = (pl.thr_a, pl.top_n, pl.min_score, pl.min_boxes)
        asked = (config.thr_a, config.top_n, config.min_score, config.min_boxes)
        if not np.allclose(made, asked):
            raise UsageError(f"{p_path} was made with (thr_a, top_n, min_score, min_boxes) {made}; this config asks "
                             f"for {asked}: run `refground pseudo bicm` with them")
        keep = pl.kept(config.thr_k)
        if len(keep) < 2 * config.batch_size:
            raise UsageError(f"only {len(keep)} pseudo labels pass Thr_k {config.thr_k}; lower --thr-k or make more "
                             "pseudo labels")
        ms = pl.scores.subset(keep)
        target = torch.from_numpy(pl.box_index[keep])
        cand = candidates(ms, config, inp.props)
        feats = kam_inputs(ms, inp.clip, inp.props, cand, config.qam)
        valid = cand["valid"]
        gen = np.random.default_rng([int(seed), 21])
        order = gen.permutation(len(keep))
        n_val = int(round(config.kam_val_fraction * len(keep)))
        held, train_idx = order[:n_val], order[n_val:]
        config.embed_dim = int(feats[0].shape[-1])
        state = spec.begin(config.to_dict(), None, resume, force)
        torch.manual_seed(seed)
        model = KnowledgeAdaptation(config.embed_dim, config.hidden)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

        def logits_of(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            v = valid[idx]
            flat = model(*(f[idx][v] for f in feats))
            out_ = torch.full(v.shape, float("-inf"))
            out_[v] = flat
            return out_, v

        def batches(rng: np.random.Generator) -> list[np.ndarray]:
            perm = train_idx[rng.permutation(len(train_idx))]
            full = len(perm) // config.batch_size * config.batch_size  # batch norm needs > 1 row: drop a ragged tail
            return [perm[a:a + config.batch_size] for a in range(0, max(full, config.batch_size), config.batch_size)]

        def train_step(index: np.ndarray, gen_: torch.Generator) -> tuple[torch.Tensor, int]:
            logits, v = logits_of(index)
            return kam_loss(logits.masked_fill(~v, 0.0), v, target[index]), len(index)

        def evaluate() -> dict[str, Any]:
            if not len(held):
                return {}
            model.eval()
            with torch.no_grad():
                logits, v = logits_of(held)
            model.train()
            return {"pseudo_val_agreement": round(float((logits.argmax(1) == target[held]).float().mean()), 5)}

        fr = fit(model, optimizer, spec, epochs=config.epochs, seed=seed, batches=batches, train_step=train_step,
                 evaluate=evaluate, select=None, state=state, description="train bicm (KAM)")
        last = fr.curve["epochs"][-1] if fr.curve.get("epochs") else {}
        metrics = {"pseudo_labels": int(len(keep)), "train_pairs": int(len(train_idx)), "held_out": int(n_val),
                   "thr_k": config.thr_k, "best_epoch": fr.best_epoch,
                   "pseudo_val_agreement": last.get("pseudo_val_agreement")}
        result.update(spec.finish(fr, config.epochs, len(train_idx), metrics),
                      seconds=round(time.perf_counter() - t_start, 3))
        return result


# --------------------------------------------------------------------------------------------- predictions


def predictions_path(run: Path, split: str, box_rule: str = "largest", phrase_box_rule: str = "union") -> Path:
    """``<run>/predictions/<split>.jsonl`` under the paper's box rules, ``<split>.<rule>-<phrase rule>.jsonl``
    under others (each rule keeps its own file)."""
    tag = "" if (box_rule, phrase_box_rule) == ("largest", "union") else f".{box_rule}-{phrase_box_rule}"
    return Path(run) / "predictions" / f"{split}{tag}.jsonl"


def _run_of(dataset: str, cache: Any, name: str) -> tuple[str, Path, BiCMConfig | None, Any, dict[str, Any]]:
    """(variant, run folder, config, origin, parents) of a run name: a training-free row or a trained run."""
    local = local_run_name(name, "bicm", dataset)
    if local == CLASS_NAME:
        return CLASS_NAME, run_dir(dataset, cache, name), None, None, {}
    if local in VARIANT_MODULES and local not in TRAINED:
        return local, run_dir(dataset, cache, name), variant_config(local), None, {}
    ref = resolve_run(name, "bicm", dataset, cache)
    if not ref.local:
        raise UsageError(f"--run {name}: BiCM predicts on the dataset its KAM was trained on")
    m = complete_run(ref.path, "bicm")
    cfg = BiCMConfig.from_dict(json.loads((ref.path / "config.json").read_text()))
    return "trained", ref.path, cfg, ref.origin(m.fingerprint), {"run": parent("file", ref.path / MODEL_FILE)}


def predict_bicm_many(dataset: str, cache: Any, name: str, splits: list[str], box_rule: str = "largest",
                      phrase_box_rule: str = "union", features: str | None = None, clip: str | None = None,
                      force: bool = False, kinds: tuple[str, ...] = QUERY_KINDS) -> list[dict[str, Any]]:
    """Write (or find current) the predictions of run or row ``name`` on each of ``splits``: a line per expression
    and per caption phrase of the split (``kinds``: only expressions, or only phrases, to save a pass). Returns
    ``{"path", "split", "status", ...}`` per split."""
    from refground.cache.lock import claim_current
    from refground.cache.manifest import parent_fingerprints
    from refground.eval.predictions import write_predictions

    variant, folder, cfg, origin, run_parents = _run_of(dataset, cache, name)
    feats = features or DEFAULT_FEATURES
    pc = cfg if cfg is not None else BiCMConfig(qam="none", sf=False, kam=False)
    inp = Inputs(dataset, cache, feats, clip, pc.top_n, pc.min_score, pc.min_boxes)
    parents = {**run_parents, **inp.parents()}
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as locks:
        kinds = tuple(k for k in QUERY_KINDS if k in kinds)
        if not kinds:
            raise UsageError(f"kinds: expected some of {', '.join(QUERY_KINDS)}")
        params = {"variant": variant, "box_rule": box_rule, "phrase_box_rule": phrase_box_rule, "features": feats,
                  "config": cfg.to_dict() if cfg is not None else None}
        if kinds != QUERY_KINDS:
            params["kinds"] = list(kinds)
        tag = "" if kinds == QUERY_KINDS else "." + kinds[0]
        jobs = [(predictions_path(folder, split + tag, box_rule, phrase_box_rule), {**params, "split": split})
                for split in splits]
        todo = []
        for split, (path, p), (fp, hit) in zip(splits, jobs, claim_current(locks, jobs, PREDICT_STEP,
                                                                            parent_fingerprints(parents), force)):
            results.append({"path": str(path), "split": split, "status": "hit", "features": feats,
                            **({"run_origin": origin} if origin is not None else {})})
            if hit is None:
                todo.append((results[-1], path, split, p, fp))
            else:
                results[-1].update(hit)
        if not todo:
            return results
        kam = load_run(folder).model if variant == "trained" else None
        for result, path, split, p, fp in todo:
            lines: list[dict[str, Any]] = []
            t0 = time.perf_counter()
            counts = {"expression": 0, "phrase": 0}
            for kind, rule in (("expression", box_rule), ("phrase", phrase_box_rule)):
                if kind not in kinds:
                    continue
                rows, texts, qids, mentions = eval_pairs(inp.ds, split, kind)
                counts[kind] = len(rows)
                if not len(rows):
                    continue
                ms, _, _ = split_scores(inp, split, kind, cfg.thr_a if cfg is not None else 0.7)
                boxes, _ = predict_boxes(inp, ms, texts, variant if variant != "trained" else "bicm", cfg, rule, kam)
                b = boxes.numpy()
                for q, mention, box in zip(qids.tolist(), mentions.tolist(), b):
                    line: dict[str, Any] = {"query_id": int(q), "box": [round(float(v), 3) for v in box]}
                    if mention >= 0:
                        line["mention"] = int(mention)
                    lines.append(line)
            if not lines:
                raise UsageError(f"dataset {dataset}: split {split!r} has no expressions or caption phrases")
            seconds = time.perf_counter() - t0
            path.parent.mkdir(parents=True, exist_ok=True)
            write_predictions(path, lines)
            write_manifest(path, step=PREDICT_STEP, params=p, parents=parents, fingerprint=fp, kind="predictions",
                           extra={"expressions": counts["expression"], "phrases": counts["phrase"],
                                  "seconds": round(seconds, 3)})
            result.update(status="written", expressions=counts["expression"], phrases=counts["phrase"])
    return results


__all__ = ["DEFAULT_FEATURES", "Inputs", "class_name_scores", "eval_pairs", "load_run", "predict_bicm_many",
           "predict_boxes", "predictions_path", "run_dir", "split_scores", "train_bicm"]
