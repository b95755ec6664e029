"""Stage `train`: meta-train one algorithm (or the transfer baseline) and write its trained init.

Outputs: ``<out>`` (``models/train/<alg>.pt``: ``finetune.init_to_dict`` of the best-by-meta-val weights plus
``config``, ``iteration``, ``val_miou``), ``<checkpoints>/last.pt`` (resume state, every ``checkpoint_every``
iterations) and ``<checkpoints>/best.pt``, and DVCLive logs in ``<results>``: ``metrics.json`` (flat summary)
and ``plots/metrics/*.tsv`` (loss, query_miou, lr every iteration, and an algorithm's own figures: l2o's
contrastive, embed_dist_same, embed_dist_cross; val_miou every ``val_every``). Timings stay out
of the DVCLive summary, which DVC reads as metrics: a completed run writes ``<results>/timings.json``
(``train_time_s``, ``s_per_step``) and ``plots/metrics/step_time_s.tsv`` itself.
A resumed run (same config) reproduces the uninterrupted run's weights exactly on CPU, and its curves: the checkpoint
carries every row logged so far, so the tsv files are rebuilt even after ``dvc repro`` deleted them.

Several processes (``train.nproc`` x ``train.nnodes``, launched by torchrun; ``metaseg.distributed``): every
process draws the whole meta-batch from the same seeded sampler and builds only its share of the tasks; the
algorithm averages the meta-gradient over processes (``Algorithm._outer_update``), so every process holds the
same weights. Rank 0 alone meta-validates and writes checkpoints, DVCLive logs and outputs (the others go on to
the next step and wait for it in the all-reduce); a resume reads rank 0's checkpoint and sends it to all.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metaseg import distributed
from metaseg.adapt import AdaptSettings
from metaseg.cli import InputError, choose_device
from metaseg.config import AdaptConfig, BaseConfig, ModelConfig, TrainConfig
from metaseg.data.episodes import Episode
from metaseg.data.prepared import PreparedDataset
from metaseg.data.sampler import EpisodeBatch, TrainSampler, episode_batch
from metaseg.data.splits import load_episodes, load_splits
from metaseg.evaluate import evaluate_inits, metrics_dict
from metaseg.io import TIMINGS, load_torch, save_with, write_text, write_timings
from metaseg.meta.algorithms import Algorithm, make_algorithm
from metaseg.meta.finetune import init_to_dict
from metaseg.models.backbones import normalization
from metaseg.models.deeplab import build_model

log = logging.getLogger(__name__)

_RESUME_IGNORES = {"algorithms", "checkpoint_every", "val_every", "val_episodes", "timeout_s"}  # keep the trajectory


class TrainingDiverged(RuntimeError):
    """A non-finite meta-loss: training stops, nothing new is written."""


def all_classes(dataset: PreparedDataset, domain: str) -> tuple[int, ...]:
    """Every class id of ``domain``: an episode assembled with these labels each class, not just the task's."""
    return tuple(range(1, dataset.domain(domain).num_classes + 1))


def run_config(algorithm: str, base: BaseConfig, model: ModelConfig, cfg: TrainConfig,
               adapt: AdaptConfig) -> dict[str, Any]:
    return {"algorithm": algorithm, "base": base.model_dump(), "model": model.model_dump(), "train": cfg.model_dump(),
            "adapt": adapt.model_dump()}


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    strip = lambda c: {**c, "base": {k: v for k, v in c["base"].items() if k != "device"},  # noqa: E731
                       "train": {k: v for k, v in c["train"].items() if k not in _RESUME_IGNORES}}
    return strip(a) == strip(b)


def val_episodes(path: Path, domains: list[str], shots: int, n: int) -> dict[str, dict[int, list[Episode]]]:
    """The first ``n`` stored episodes per meta-val domain, at K = ``shots`` if every domain stores it (else the
    smallest K they all store), as ``{domain: {K: episodes}}``."""
    stored = load_episodes(path)
    per_domain = {d: stored.get(d, {}) for d in domains}
    missing = [d for d, per_k in per_domain.items() if not per_k]
    if missing:
        raise InputError(f"{path}: no stored episodes for meta-val domain(s) {', '.join(missing)}; re-run splits")
    common = set.intersection(*(set(per_k) for per_k in per_domain.values())) if per_domain else set()
    if not common:
        raise InputError(f"{path}: the meta-val domains share no K; re-run splits")
    k = shots if shots in common else min(common)
    return {d: {k: per_k[k][:n]} for d, per_k in per_domain.items()}


def meta_validate(algo: Algorithm, dataset: PreparedDataset, episodes: dict[str, dict[int, list[Episode]]], *,
                  settings: AdaptSettings, device: torch.device, seed: int, backbone: str, image_size: int,
                  output_stride: int = 16, body_stage: int | None = None) -> float:
    """The evaluate stage's number on the meta-val episodes: ``evaluate_inits`` with the ``adapt`` rule, the
    accumulated foreground mIoU in percent, averaged over the meta-val domains (the report's mean row). NaN when
    nothing could be scored (every episode diverged)."""
    init = algo.export_init(backbone=backbone, image_size=image_size, output_stride=output_stride,
                            body_stage=body_stage)
    domains = sorted(episodes)
    shots = sorted({k for per_k in episodes.values() for k in per_k})
    result = evaluate_inits(dataset, episodes, {init.algorithm: init}, domains=domains, shots=shots,
                            settings=settings, device=device, seed=seed, progress=False, curve=False)
    flat = metrics_dict(result, domains=domains, shots=shots, no_adapt=False)
    return float(np.mean([flat.get(f"mean.{init.algorithm}.shot{k}.miou", math.nan) for k in shots]))


def write_curves(results: Path, curves: dict[str, list[tuple[int, Any]]]) -> None:
    """Rewrite ``plots/metrics/<name>.tsv`` from the rows a checkpoint carries, in DVCLive's layout, atomically.

    A resumed run starts from these: ``dvc repro`` deletes the stage's plots before it reruns the stage, and a killed
    run may have logged rows past its last checkpoint, so neither the files on disk nor their absence can be trusted.
    """
    folder = results / "plots" / "metrics"
    for tsv in folder.glob("*.tsv"):
        if tsv.stem not in curves:
            tsv.unlink()
    for name, rows in curves.items():
        write_text(folder / f"{name}.tsv", "".join(f"{step}\t{value}\n" for step, value in [("step", name), *rows]))


def write_step_times(results: Path, step_times: list[float]) -> None:
    """``plots/metrics/step_time_s.tsv`` in DVCLive's layout (step = iteration, 1-based), written atomically."""
    rows = [f"{step}\t{dt!r}" for step, dt in enumerate(step_times, start=1) if math.isfinite(dt)]
    write_text(results / "plots" / "metrics" / "step_time_s.tsv", "\n".join(["step\tstep_time_s", *rows]) + "\n")


def _seed_rank_rng(saved: Tensor | list[Tensor] | None, *, rank: int, seed: int) -> None:
    """This process's torch RNG (dropout in transfer's train-mode forward): the saved state of its rank when the
    checkpoint holds one, else rank 0 keeps the single-process stream and rank r > 0 starts its own."""
    states = [saved] if isinstance(saved, Tensor) else saved or []
    if rank < len(states):
        torch.set_rng_state(states[rank])
    elif rank > 0:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def train(algorithm: str, *, prepared: str | Path, splits: str | Path, out: str | Path, checkpoints: str | Path,
          results: str | Path, base: BaseConfig, model_cfg: ModelConfig, cfg: TrainConfig, adapt_cfg: AdaptConfig,
          stop_after: int | None = None) -> dict[str, float] | None:
    """Train; returns the flat metrics on rank 0 (None when ``stop_after`` iterations ended the run early, and on
    the other processes of a torchrun launch)."""
    from dvclive import Live
    from tqdm import tqdm

    from metaseg.data.augment import build_augment

    prepared, splits, out, checkpoints, results = map(Path, (prepared, splits, out, checkpoints, results))
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0  # the one process that validates and writes
    device = torch.device(choose_device(base.device))
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", torch.cuda.current_device())  # torchrun: this process's GPU (LOCAL_RANK)
        torch.backends.cudnn.benchmark = True
    config = run_config(algorithm, base, model_cfg, cfg, adapt_cfg)
    dataset = PreparedDataset(prepared)
    roles = load_splits(splits / "splits.json")
    sampler = TrainSampler(dataset, roles["meta_train"], ways=cfg.ways, shots=cfg.shots, queries=cfg.queries,
                           seed=base.seed)
    augment = build_augment(base.image_size) if cfg.augment else None
    val_eps = val_episodes(splits / "episodes.json", roles["meta_val"], cfg.shots, cfg.val_episodes)
    settings = AdaptSettings.from_config(adapt_cfg)

    torch.manual_seed(base.seed)
    model = build_model(model_cfg.backbone, aux_loss=model_cfg.aux_loss, backbone_weights=model_cfg.backbone_weights,
                        output_stride=model_cfg.output_stride, body_stage=model_cfg.body_stage)
    model = model.to(device, memory_format=torch.channels_last if cuda and cfg.channels_last else torch.preserve_format)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if cuda else None
    algo = make_algorithm(algorithm, model, inner_steps=cfg.inner_steps, inner_lr=cfg.inner_lr, outer_lr=cfg.outer_lr,
                          outer_optimizer=cfg.outer_optimizer, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
                          iterations=cfg.iterations, aux_weight=cfg.aux_weight,
                          dice_weight=cfg.dice_weight, class_balance=cfg.class_balance, inner_clip=cfg.inner_clip,
                          outer_clip=cfg.outer_clip, bn_stats=model_cfg.bn_stats, inner_params=cfg.inner_params,
                          amp_dtype=amp, l2o=cfg.l2o.model_dump())
    export_kw = {"backbone": model_cfg.backbone, "image_size": base.image_size,
                 "output_stride": model_cfg.output_stride, "body_stage": model_cfg.body_stage}
    norm = normalization(model_cfg.backbone)

    last, best_path = checkpoints / "last.pt", checkpoints / "best.pt"
    start, best, best_it, initial, elapsed = 0, -math.inf, -1, float("nan"), 0.0
    step_times: list[float] = []  # seconds per iteration, index i = iteration i + 1
    curves: dict[str, list[tuple[int, Any]]] = {}  # every DVCLive row logged so far: {name: [(step, value)]}
    # rank 0 reads the checkpoint and sends it to every process: all resume alike, other nodes need no copy
    ck = distributed.broadcast_object(
        load_torch(last, what="training checkpoint", hint="delete it to start a fresh run", weights_only=False)
        if main and last.is_file() else None)
    rng = None
    if ck is not None:
        if ck.get("complete"):
            log.info("%s is from a completed run; starting a fresh run", last)
        elif _same_run(ck["config"], config):
            algo.load_state_dict(ck["algorithm"])
            sampler.load_state_dict(ck["sampler"])
            rng = ck["torch_rng"]
            start, best, best_it, initial, elapsed = (ck["iteration"], ck["best"], ck["best_iteration"],
                                                      ck["initial_val_miou"], ck["train_time_s"])
            step_times = list(ck.get("step_times", [math.nan] * start))
            curves = {k: [tuple(r) for r in v] for k, v in ck.get("curves", {}).items()}
            log.info("resuming %s from %s at iteration %d", algorithm, last, start)
        else:
            log.warning("%s was written with another config; starting a fresh run", last)
    del ck
    _seed_rank_rng(rng, rank=rank, seed=base.seed)
    # identical starting weights on every process whatever happened above (as DistributedDataParallel does)
    distributed.broadcast_tensors([*model.parameters(), *model.buffers(), *algo.extra_parameters().values()])
    live = None
    if main:
        if start == 0:
            best_path.unlink(missing_ok=True)
        (results / TIMINGS).unlink(missing_ok=True)  # written again when this run completes
        if start > 0:
            write_curves(results, curves)  # the curves up to the checkpoint, whatever DVC or the killed run left
        live = Live(dir=str(results), resume=start > 0, save_dvc_exp=False, dvcyaml=None)
    # DVCLive step = completed iterations: the initial validation is step 0, iteration i (1-based) is step i

    def log_metric(name: str, value: float) -> None:  # rank 0 only
        live.log_metric(name, value)
        curves.setdefault(name, []).append((live.step, value if math.isfinite(value) else str(value)))

    def validate(it: int) -> float:  # rank 0 only
        nonlocal best, best_it
        miou = meta_validate(algo, dataset, val_eps, settings=settings, device=device, seed=base.seed, **export_kw)
        log_metric("val_miou", miou)
        if math.isfinite(miou) and miou > best:  # a NaN validation (nothing scored) never picks a checkpoint
            best, best_it = miou, it
            init = init_to_dict(algo.export_init(**export_kw))
            save_with(best_path, lambda p: torch.save({**init, "config": config, "iteration": it, "val_miou": miou}, p))
        return miou

    if start == 0 and live is not None:
        live.step = 0
        initial = validate(0)
        live.next_step()
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=f"train {algorithm}",
               disable=not main)
    val = float("nan")
    for it in bar:
        t0 = time.perf_counter()
        tasks: list[EpisodeBatch] = []
        # every process draws the whole meta-batch (same sampler state everywhere) and builds its share of it
        drawn = [sampler.sample_seeded() for _ in range(cfg.meta_batch)]
        for ep, seed in distributed.share(drawn, rank, world):
            if algorithm == "transfer":  # supervised on the same images: every class of the domain is foreground
                ep = replace(ep, class_ids=all_classes(dataset, ep.domain))
            b = episode_batch(dataset.domain(ep.domain), ep, norm=norm, augment=augment, seed=seed).to(
                device, non_blocking=True)
            if cuda and cfg.channels_last:
                b = replace(b, support_x=b.support_x.contiguous(memory_format=torch.channels_last),
                            query_x=b.query_x.contiguous(memory_format=torch.channels_last))
            tasks.append(b)
        lr = algo.optimizer.param_groups[0]["lr"]
        m = algo.step(tasks)
        if not math.isfinite(m["loss"]):
            good = f"{last} (iteration {start})" if last.is_file() else "none"
            raise TrainingDiverged(f"{algorithm}: non-finite meta-loss ({m['loss']}) at iteration {it + 1}; stopped "
                                   f"without writing; last good checkpoint: {good}")
        dt = time.perf_counter() - t0
        elapsed += dt
        step_times.append(dt)
        done = it + 1
        if live is not None:
            live.step = done
            for k, v in (("loss", m["loss"]), ("query_miou", m["miou"]), ("lr", lr)):
                log_metric(k, v)
            for k, v in m.items():  # an algorithm's own figures (l2o: contrastive term, embedding distances)
                if k not in ("loss", "miou") and math.isfinite(v):
                    log_metric(k, v)
            if done % cfg.val_every == 0 or done == cfg.iterations:
                val = validate(done)
            bar.set_postfix(loss=f"{m['loss']:.3f}", miou=f"{m['miou']:.3f}", val=f"{val:.3f}")
            live.next_step()
        if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
            rngs = distributed.gather_objects(torch.get_rng_state())  # every process's, for a bit-exact resume
            if main:
                state = {"algorithm": algo.state_dict(), "sampler": sampler.state_dict(),
                         "torch_rng": rngs[0] if world == 1 else rngs,
                         "iteration": done, "config": config, "best": best, "best_iteration": best_it,
                         "initial_val_miou": initial, "train_time_s": elapsed, "step_times": list(step_times),
                         "curves": {k: list(v) for k, v in curves.items()},
                         "complete": done == cfg.iterations}
                save_with(last, lambda p: torch.save(state, p))
            start = done
        if stop_after is not None and done >= stop_after and done < cfg.iterations:
            if live is not None:
                live.end()
            log.info("stopping after iteration %d (stop_after)", done)
            return None
    bar.close()
    if live is None:
        return None
    if not best_path.is_file():  # every validation was NaN: ship the last iteration, not the untrained init
        log.warning("%s: no meta-validation produced a score (all NaN); keeping the last iteration (%d)", algorithm,
                    cfg.iterations)
        best, best_it = math.nan, cfg.iterations
        init = init_to_dict(algo.export_init(**export_kw))
        save_with(best_path, lambda p: torch.save({**init, "config": config, "iteration": best_it,
                                                   "val_miou": float("nan")}, p))
    final = torch.load(best_path, map_location="cpu", weights_only=False)
    save_with(out, lambda p: torch.save(final, p))
    steps_run = max(1, cfg.iterations)
    metrics = {"best_val_miou": float(best), "best_iteration": int(best_it), "final_val_miou": float(val),
               "initial_val_miou": float(initial), "iterations": cfg.iterations}
    live.summary.update(metrics)
    live.end()
    timings = {"train_time_s": round(elapsed, 3), "s_per_step": round(elapsed / steps_run, 4)}
    write_step_times(results, step_times)
    write_timings(results, timings)
    log.info("%s: best val mIoU %.4f at iteration %d (initial %.4f), %.2f s/step", algorithm, best, best_it, initial,
             timings["s_per_step"])
    return metrics
