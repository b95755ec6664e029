"""Stage `train`: meta-train one algorithm (or the transfer baseline) and write its trained init.

Outputs: ``<out>`` (``models/train/<alg>.pt``: ``fast_adapt.init_to_dict`` of the best-by-meta-val weights plus
``config``, ``iteration``, ``val_miou``), ``<checkpoints>/last.pt`` (resume state, every ``checkpoint_every``
iterations) and ``<checkpoints>/best.pt``, and DVCLive logs in ``<results>``: ``metrics.json`` (flat summary)
and ``plots/metrics/*.tsv`` (loss, query_miou, lr, step_time_s every iteration; val_miou every ``val_every``).
A resumed run (same config) reproduces the uninterrupted run's weights exactly on CPU.
"""
from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from metaseg.cli import choose_device
from metaseg.config import BaseConfig, ModelConfig, TrainConfig
from metaseg.data.episodes import Episode
from metaseg.data.prepared import PreparedDataset
from metaseg.data.sampler import EpisodeBatch, TrainSampler, episode_batch
from metaseg.data.splits import load_episodes, load_splits
from metaseg.io import save_with
from metaseg.meta.algorithms import Algorithm, foreground_miou, make_algorithm
from metaseg.meta.fast_adapt import adapt, init_to_dict
from metaseg.models.backbones import normalization
from metaseg.models.deeplab import build_model

log = logging.getLogger(__name__)

_RESUME_IGNORES = {"algorithms", "checkpoint_every", "val_every", "val_episodes"}  # do not change the trajectory


class TrainingDiverged(RuntimeError):
    """A non-finite meta-loss: training stops, nothing new is written."""


def all_classes(dataset: PreparedDataset, domain: str) -> tuple[int, ...]:
    """Every class id of ``domain``: an episode assembled with these labels each class, not just the task's."""
    return tuple(range(1, dataset.domain(domain).num_classes + 1))


def run_config(algorithm: str, base: BaseConfig, model: ModelConfig, cfg: TrainConfig) -> dict[str, Any]:
    return {"algorithm": algorithm, "base": base.model_dump(), "model": model.model_dump(), "train": cfg.model_dump()}


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    strip = lambda c: {**c, "base": {k: v for k, v in c["base"].items() if k != "device"},  # noqa: E731
                       "train": {k: v for k, v in c["train"].items() if k not in _RESUME_IGNORES}}
    return strip(a) == strip(b)


def val_episodes(path: Path, domains: list[str], shots: int, n: int) -> list[Episode]:
    """The first ``n`` stored episodes per meta-val domain, at K = ``shots`` if stored (else the smallest K)."""
    stored = load_episodes(path)
    out: list[Episode] = []
    for d in domains:
        per_k = stored.get(d, {})
        if per_k:
            out += per_k[shots if shots in per_k else min(per_k)][:n]
    return out


def meta_validate(algo: Algorithm, dataset: PreparedDataset, episodes: list[Episode], *, steps: int,
                  backbone: str, image_size: int, device: torch.device, output_stride: int = 16,
                  body_stage: int | None = None) -> float:
    """Mean query mIoU after ``fast_adapt.adapt`` (``steps`` inner steps) over the stored meta-val episodes."""
    if not episodes:
        return float("nan")
    init = algo.export_init(backbone=backbone, image_size=image_size, output_stride=output_stride,
                            body_stage=body_stage)
    scores = []
    for ep in episodes:
        b = episode_batch(dataset.domain(ep.domain), ep, norm=init.norm).to(device)
        model = adapt(init, b.support_x, b.support_y, len(ep.class_ids), steps=steps)
        scores.append(foreground_miou(model.predict_logits(b.query_x), b.query_y, len(ep.class_ids)))
    scores = [s for s in scores if not math.isnan(s)]
    return sum(scores) / len(scores) if scores else float("nan")


def _trim_logs(results: Path, step: int) -> None:
    """Drop DVCLive rows logged after the checkpoint we resume from (the killed run got further)."""
    for tsv in (results / "plots" / "metrics").glob("*.tsv"):
        with open(tsv, newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        if rows:
            keep = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step]
            with open(tsv, "w", newline="") as f:
                csv.writer(f, delimiter="\t").writerows(keep)


def train(algorithm: str, *, prepared: str | Path, splits: str | Path, out: str | Path, checkpoints: str | Path,
          results: str | Path, base: BaseConfig, model_cfg: ModelConfig, cfg: TrainConfig,
          stop_after: int | None = None) -> dict[str, float] | None:
    """Train; returns the flat metrics (None when ``stop_after`` iterations ended the run early)."""
    from dvclive import Live
    from tqdm import tqdm

    from metaseg.data.augment import build_augment

    prepared, splits, out, checkpoints, results = map(Path, (prepared, splits, out, checkpoints, results))
    device = torch.device(choose_device(base.device))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    config = run_config(algorithm, base, model_cfg, cfg)
    dataset = PreparedDataset(prepared)
    roles = load_splits(splits / "splits.json")
    sampler = TrainSampler(dataset, roles["meta_train"], ways=cfg.ways, shots=cfg.shots, queries=cfg.queries,
                           seed=base.seed)
    augment = build_augment(base.image_size) if cfg.augment else None
    val_eps = val_episodes(splits / "episodes.json", roles["meta_val"], cfg.shots, cfg.val_episodes)

    torch.manual_seed(base.seed)
    model = build_model(model_cfg.backbone, aux_loss=model_cfg.aux_loss, backbone_weights=model_cfg.backbone_weights,
                        output_stride=model_cfg.output_stride, body_stage=model_cfg.body_stage)
    model = model.to(device, memory_format=torch.channels_last if cuda and cfg.channels_last else torch.preserve_format)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if cuda else None
    algo = make_algorithm(algorithm, model, inner_steps=cfg.inner_steps, inner_lr=cfg.inner_lr, outer_lr=cfg.outer_lr,
                          outer_optimizer=cfg.outer_optimizer, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
                          iterations=cfg.iterations, reptile_epsilon=cfg.reptile_epsilon, aux_weight=cfg.aux_weight,
                          dice_weight=cfg.dice_weight, class_balance=cfg.class_balance, inner_clip=cfg.inner_clip,
                          outer_clip=cfg.outer_clip, bn_stats=model_cfg.bn_stats, inner_params=cfg.inner_params,
                          amp_dtype=amp)
    export_kw = {"backbone": model_cfg.backbone, "image_size": base.image_size,
                 "output_stride": model_cfg.output_stride, "body_stage": model_cfg.body_stage}
    norm = normalization(model_cfg.backbone)

    last, best_path = checkpoints / "last.pt", checkpoints / "best.pt"
    start, best, best_it, initial, elapsed = 0, -math.inf, -1, float("nan"), 0.0
    if last.is_file():
        ck = torch.load(last, map_location="cpu", weights_only=False)
        if ck.get("complete"):
            log.info("%s is from a completed run; starting a fresh run", last)
        elif _same_run(ck["config"], config):
            algo.load_state_dict(ck["algorithm"])
            sampler.load_state_dict(ck["sampler"])
            torch.set_rng_state(ck["torch_rng"])
            start, best, best_it, initial, elapsed = (ck["iteration"], ck["best"], ck["best_iteration"],
                                                      ck["initial_val_miou"], ck["train_time_s"])
            log.info("resuming %s from %s at iteration %d", algorithm, last, start)
        else:
            log.warning("%s was written with another config; starting a fresh run", last)
    if start == 0:
        best_path.unlink(missing_ok=True)
    live = Live(dir=str(results), resume=start > 0, save_dvc_exp=False, dvcyaml=None)
    if start > 0:
        _trim_logs(results, start)
    # DVCLive step = completed iterations: the initial validation is step 0, iteration i (1-based) is step i

    def validate(it: int) -> float:
        nonlocal best, best_it
        miou = meta_validate(algo, dataset, val_eps, steps=cfg.inner_steps, device=device, **export_kw)
        live.log_metric("val_miou", miou)
        if miou > best or best_it < 0:
            best, best_it = miou, it
            init = init_to_dict(algo.export_init(**export_kw))
            save_with(best_path, lambda p: torch.save({**init, "config": config, "iteration": it, "val_miou": miou}, p))
        return miou

    if start == 0:
        live.step = 0
        initial = validate(0)
        live.next_step()
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=f"train {algorithm}")
    val = float("nan")
    for it in bar:
        t0 = time.perf_counter()
        tasks: list[EpisodeBatch] = []
        for _ in range(cfg.meta_batch):
            ep, seed = sampler.sample_seeded()
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
        live.step = it + 1
        for k, v in (("loss", m["loss"]), ("query_miou", m["miou"]), ("lr", lr), ("step_time_s", dt)):
            live.log_metric(k, v)
        done = it + 1
        if done % cfg.val_every == 0 or done == cfg.iterations:
            val = validate(done)
        bar.set_postfix(loss=f"{m['loss']:.3f}", miou=f"{m['miou']:.3f}", val=f"{val:.3f}")
        live.next_step()
        if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
            state = {"algorithm": algo.state_dict(), "sampler": sampler.state_dict(),
                     "torch_rng": torch.get_rng_state(),
                     "iteration": done, "config": config, "best": best, "best_iteration": best_it,
                     "initial_val_miou": initial, "train_time_s": elapsed, "complete": done == cfg.iterations}
            save_with(last, lambda p: torch.save(state, p))
            start = done
        if stop_after is not None and done >= stop_after and done < cfg.iterations:
            live.end()
            log.info("stopping after iteration %d (stop_after)", done)
            return None
    bar.close()
    final = torch.load(best_path, map_location="cpu", weights_only=False)
    save_with(out, lambda p: torch.save(final, p))
    steps_run = max(1, cfg.iterations)
    metrics = {"best_val_miou": float(best), "best_iteration": int(best_it), "final_val_miou": float(val),
               "initial_val_miou": float(initial), "iterations": cfg.iterations, "train_time_s": round(elapsed, 3),
               "s_per_step": round(elapsed / steps_run, 4)}
    live.summary.update(metrics)
    live.end()
    log.info("%s: best val mIoU %.4f at iteration %d (initial %.4f), %.2f s/step", algorithm, best, best_it, initial,
             metrics["s_per_step"])
    return metrics
