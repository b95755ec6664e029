"""The `evaluate` stage's library: every init x every stored episode, with the adaptation curve and 95% CIs.

For each meta-test domain and K, each stored episode (``episodes.json``, never redrawn here) is assembled once and
shared by every init. Each init adapts on the episode's support with the ONE inner loop
(``metaseg.meta.finetune.adapt``); its ``on_step`` hook predicts the query after 0, 1, 2, 3, 5, 10, ..., steps
steps (``curve_steps``), so one run gives the "mIoU vs adaptation steps" curve (step 0 = the init without
adaptation, reported as init ``<init>_noadapt``). Randomness inside an adaptation (mini-batches, augmentation)
comes from a generator seeded by (seed, domain, K, episode index) only, so an episode gets the same randomness
for every init and every run.

Scores are in percent (0-100): mIoU and FB-IoU accumulated over the episodes (``metaseg.scoring``), and the
per-episode mean with its 95% CI half-width.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import queue as queue_mod
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from metaseg.adapt import AdaptSettings, baseline_init, run_adapt
from metaseg.cli import InputError
from metaseg.config import ModelConfig, TrainConfig
from metaseg.data.episodes import Episode
from metaseg.data.prepared import PreparedDataset
from metaseg.data.sampler import episode_batch
from metaseg.scoring import DomainScorer, Scores
from metaseg.meta import finetune

log = logging.getLogger(__name__)

NOADAPT = "_noadapt"
_EVAL_STREAM = 0xE7A1


@dataclass
class Overlay:
    """One query image kept for the overlay grid: image, episode labels, each init's final prediction."""

    domain: str
    shot: int
    image: np.ndarray  # uint8 [H, W, 3]
    target: np.ndarray  # uint8 [H, W], episode labels (0..ways, 255)
    class_ids: tuple[int, ...]  # episode label i + 1 = domain class class_ids[i]
    caption: str
    preds: dict[str, np.ndarray] = field(default_factory=dict)


_CURVE_GRID = (1, 2, 3, 5, 10, 15, 20, 30, 50, 100, 200, 500)


def curve_steps(steps: int, *, curve: bool = True) -> list[int]:
    """The adaptation steps the curve is scored at: 0, a fixed grid below ``steps``, and ``steps`` itself
    (``curve=False``: ``steps`` alone, for meta-validation).

    Scoring every step would cost a support forward (the BN statistics under the new params) and a query forward
    per step, about a third of the evaluate stage at 20 steps, for points nobody reads between the grid's."""
    if not curve:
        return [steps]
    return sorted({0, steps, *(s for s in _CURVE_GRID if s < steps)})


@dataclass
class EvalResult:
    """``curves[(domain, init, K)][i]`` = Scores after ``curve_steps[i]`` steps (first: 0, last: ``steps``);
    ``speed`` = throughput figures."""

    curves: dict[tuple[str, str, int], list[Scores]]
    overlays: dict[str, list[Overlay]]
    speed: dict[str, float]
    steps: int
    diverged: dict[tuple[str, str, int], int] = field(default_factory=dict)  # episodes with non-finite logits
    curve: bool = True  # False: scored after the last step only (meta-validation)

    @property
    def curve_steps(self) -> list[int]:
        return curve_steps(self.steps, curve=self.curve)

    def final(self, domain: str, init: str, shot: int) -> Scores:
        """The score an init reaches: after all steps, or at step 0 for ``<init>_noadapt``."""
        if init.endswith(NOADAPT):
            return self.curves[(domain, init.removesuffix(NOADAPT), shot)][0]
        return self.curves[(domain, init, shot)][-1]


def episode_seed(seed: int, domain: str, shot: int, index: int) -> int:
    """The seed of one stored episode's adaptation randomness (independent of the init)."""
    ss = np.random.SeedSequence([seed, zlib.crc32(domain.encode("utf-8")), shot, index, _EVAL_STREAM])
    return int(ss.generate_state(1)[0])


Unit = tuple[str, int]  # (domain, K): the work of one worker task, keys of its scores disjoint from the others'


@dataclass
class _UnitResult:
    """One (domain, K) unit's output, keyed by init name."""

    unit: Unit
    scorers: dict[str, list[DomainScorer]]  # per step
    diverged: dict[str, int]
    overlays: list[Overlay]
    init_time: dict[str, float]


def _evaluate_unit(dataset: PreparedDataset, episodes: list[Episode], inits: dict[str, finetune.TrainedInit],
                   unit: Unit, *, settings: AdaptSettings, device: torch.device, seed: int, overlay_images: int,
                   overlay_shot: int, tick: Callable[[], None], curve: bool = True) -> _UnitResult:
    """Every init on every stored episode of one (domain, K); ``tick()`` after each episode."""
    d, k = unit
    domain = dataset.domain(d)
    out = _UnitResult(unit, {}, {}, [], {name: 0.0 for name in inits})
    norm = shared_norm(inits)
    overlays = out.overlays
    diverged: dict[str, torch.Tensor] = {}
    at = curve_steps(settings.steps, curve=curve)
    index = {s: i for i, s in enumerate(at)}
    for name in inits:
        out.scorers[name] = [DomainScorer(domain.num_classes, device) for _ in at]
        diverged[name] = torch.zeros((), dtype=torch.int64, device=device)
    for i, ep in enumerate(episodes):
        batch = episode_batch(domain, ep, norm=norm).to(device)
        keep = bool(overlay_images > 0 and k == overlay_shot and len(overlays) < overlay_images and ep.query)
        if keep:
            names = "+".join(domain.class_names[c - 1] for c in ep.class_ids)
            overlays.append(Overlay(d, k, np.asarray(domain.images[ep.query[0]]),
                                    batch.query_y[0].to("cpu", torch.uint8).numpy(), ep.class_ids,
                                    f"episode {i}: {names}"))
        for name, init in inits.items():
            t0 = time.perf_counter()
            curve = out.scorers[name]

            def on_step(step: int, model: finetune.AdaptedModel, curve: list[DomainScorer] = curve,
                        name: str = name) -> None:
                with torch.no_grad():
                    logits = model.predict_logits(batch.query_x)
                pred = logits.argmax(1)
                curve[index[step]].add(ep.class_ids, pred, batch.query_y)
                if step == settings.steps:  # non-finite logits: the adaptation blew up (lr too high)
                    diverged[name] += (~torch.isfinite(logits)).any()
                if keep and step == settings.steps:
                    overlays[-1].preds[name] = pred[0].to("cpu", torch.uint8).numpy()

            run_adapt(init, batch.support_x, batch.support_y, len(ep.class_ids), settings=settings,
                      seed=episode_seed(seed, d, k, i), image_size=int(domain.images.shape[1]), on_step=on_step,
                      on_step_at=at)
            out.init_time[name] += time.perf_counter() - t0
        tick()
    out.diverged = {name: int(v) for name, v in diverged.items()}
    return out


def _worker(queue: Any, root: str, work: list[tuple[Unit, list[Episode]]], inits_blob: bytes,
            kwargs: dict[str, Any], threads: int) -> None:
    """Process-pool worker (spawned): its units in order; puts ("tick",), then ("done", results) or ("error", text).

    Tensors cross the process boundary as plain pickle bytes: torch's multiprocessing pickler would share them
    through file descriptors that vanish when the worker exits before the parent reads them."""
    try:
        torch.set_num_threads(threads)
        dataset = PreparedDataset(root)
        inits = pickle.loads(inits_blob)
        results = [_evaluate_unit(dataset, eps, inits, unit, tick=lambda: queue.put(("tick",)), **kwargs)
                   for unit, eps in work]
        queue.put(("done", pickle.dumps(results)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        queue.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def _run_parallel(dataset: PreparedDataset, work: list[tuple[Unit, list[Episode]]],
                  inits: dict[str, finetune.TrainedInit], kwargs: dict[str, Any], workers: int,
                  tick: Callable[[], None]) -> list[_UnitResult]:
    """Spread the units over ``workers`` spawned processes (largest K first, round-robin), each with
    cores / workers threads. Small CPU batches use two threads poorly, so two 1-thread workers do more per second."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    order = sorted(range(len(work)), key=lambda i: -work[i][0][1])
    shares: list[list[tuple[Unit, list[Episode]]]] = [[] for _ in range(workers)]
    for j, i in enumerate(order):
        shares[j % workers].append(work[i])
    threads = max(1, torch.get_num_threads() // workers)
    blob = pickle.dumps(inits)
    procs = [ctx.Process(target=_worker, args=(queue, str(dataset.root), share, blob, kwargs, threads), daemon=True)
             for share in shares if share]
    for proc in procs:
        proc.start()
    results: list[_UnitResult] = []
    done = 0
    try:
        while done < len(procs):
            try:
                msg = queue.get(timeout=5.0)
            except queue_mod.Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise RuntimeError(f"an evaluate worker died (exit code {dead[0].exitcode})") from None
                continue
            if msg[0] == "tick":
                tick()
            elif msg[0] == "done":
                results += pickle.loads(msg[1])
                done += 1
            else:
                raise RuntimeError(f"an evaluate worker failed: {msg[1]}")
    finally:
        for proc in procs:
            if proc.is_alive() and done < len(procs):
                proc.terminate()
            proc.join()
    return results


def evaluate_inits(dataset: PreparedDataset, episodes: dict[str, dict[int, list[Episode]]],
                   inits: dict[str, finetune.TrainedInit], *, domains: list[str], shots: list[int],
                   settings: AdaptSettings, device: torch.device, seed: int, ci: str = "t",
                   bootstrap_samples: int = 1000, overlay_images: int = 0, progress: bool = True,
                   workers: int = 1, curve: bool = True) -> EvalResult:
    """Run every init on every stored episode of ``domains`` x ``shots``; returns per-step scores for each.

    ``workers`` > 1 (CPU only) evaluates the (domain, K) units in that many spawned processes; every episode's
    randomness depends on (seed, domain, K, index) only, so the scores equal a one-process run with the same
    threads per process. ``curve=False`` scores the last step only (no curve, no ``<init>_noadapt``): the same
    final scores at a fraction of the cost, for meta-validation.
    """
    for d in domains:
        if d not in episodes:
            raise InputError(f"domain '{d}' has no stored episodes (episodes.json has: {', '.join(episodes)})")
        for k in shots:
            if k not in episodes[d]:
                raise InputError(f"domain '{d}' has no stored {k}-shot episodes (has K = {sorted(episodes[d])})")
    work = [((d, k), episodes[d][k]) for d in domains for k in shots]
    kwargs = {"settings": settings, "device": device, "seed": seed, "overlay_images": overlay_images,
              "overlay_shot": min(shots), "curve": curve}
    total = sum(len(eps) for _, eps in work)
    bar = tqdm(total=total, desc="evaluate", unit="ep", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    workers = min(workers, len(work)) if device.type == "cpu" else 1
    if workers > 1:
        results = _run_parallel(dataset, work, inits, kwargs, workers, lambda: bar.update(1))
    else:
        results = [_evaluate_unit(dataset, eps, inits, unit, tick=lambda: bar.update(1), **kwargs)
                   for unit, eps in work]
    bar.close()
    elapsed = time.perf_counter() - start
    scorers: dict[tuple[str, str, int], list[DomainScorer]] = {}
    failed: dict[tuple[str, str, int], int] = {}
    overlays: dict[str, list[Overlay]] = {d: [] for d in domains}
    init_time = {name: 0.0 for name in inits}
    by_unit = {r.unit: r for r in results}
    for d in domains:  # the one-process order, whatever order the workers finished in
        for k in shots:
            r = by_unit[(d, k)]
            for name in inits:
                scorers[(d, name, k)] = r.scorers[name]
                failed[(d, name, k)] = r.diverged[name]
            overlays[d] += r.overlays
    for r in results:
        for name, t in r.init_time.items():
            init_time[name] += t
    curves = {key: [s.summary(ci=ci, bootstrap_samples=bootstrap_samples, seed=seed) for s in per_step]
              for key, per_step in scorers.items()}
    speed = {"episodes_per_s": total / elapsed if elapsed > 0 else 0.0, "seconds": elapsed, "episodes": float(total)}
    for name, t in init_time.items():  # per-init figures are per process (workers run side by side)
        speed[f"{name}.episodes_per_s"] = total / t if t > 0 else 0.0
    log.info("evaluated %d episodes x %d inits in %.1f s (%.2f episodes/s, %d process%s)", total, len(inits),
             elapsed, speed["episodes_per_s"], workers, "es" if workers > 1 else "")
    for (d, name, k), n in failed.items():
        if n:
            log.warning("%s / %s / %d-shot: %d of %d adapted models gave non-finite logits (adaptation diverged; "
                        "lower adapt.lr or the init's inner lr)", d, name, k, n, len(episodes[d][k]))
    return EvalResult(curves=curves, overlays=overlays, speed=speed, steps=settings.steps, diverged=failed,
                      curve=curve)


def init_names(result: EvalResult, *, no_adapt: bool) -> list[str]:
    """Reported inits in a stable order: each init, then (with ``no_adapt``) each ``<init>_noadapt``."""
    base = list(dict.fromkeys(init for (_, init, _) in result.curves))
    return base + ([f"{n}{NOADAPT}" for n in base] if no_adapt else [])


def metrics_dict(result: EvalResult, *, domains: list[str], shots: list[int], no_adapt: bool) -> dict[str, float]:
    """Flat DVC metrics: ``<domain>.<init>.shot<K>.{miou,fbiou,episode_miou,ci95}`` and ``mean.<init>.shot<K>.*``."""
    out: dict[str, float] = {}
    for init in init_names(result, no_adapt=no_adapt):
        for k in shots:
            per_domain = []
            for d in domains:
                s = result.final(d, init, k)
                per_domain.append(s)
                key = f"{d}.{init}.shot{k}"
                out[f"{key}.miou"] = round(100 * s.miou, 4)
                out[f"{key}.fbiou"] = round(100 * s.fbiou, 4)
                out[f"{key}.episode_miou"] = round(100 * s.episode.mean, 4)
                if s.episode.n >= 2:
                    out[f"{key}.ci95"] = round(100 * s.episode.half_width, 4)
                if not init.endswith(NOADAPT):
                    out[f"{key}.diverged"] = float(result.diverged.get((d, init, k), 0))
            out[f"mean.{init}.shot{k}.miou"] = round(100 * float(np.mean([s.miou for s in per_domain])), 4)
            out[f"mean.{init}.shot{k}.fbiou"] = round(100 * float(np.mean([s.fbiou for s in per_domain])), 4)
    return {k: v for k, v in out.items() if np.isfinite(v)}


@dataclass(frozen=True)
class Budget:
    """Each init's step budget chosen on the meta-val episodes, and the meta-test result at that budget.

    ``steps[(init, K)]`` = the curve step with the highest meta-val mIoU (mean over the meta-val domains; ties go to
    fewer steps); ``val_miou[(init, K)]`` = that mIoU in percent; ``result`` = the meta-test result cut at those
    steps, so ``result.final`` is each init's score after its own budget. Early stopping chosen where it is
    allowed to be chosen: the test episodes never pick the step count.
    """

    steps: dict[tuple[str, int], int]
    val_miou: dict[tuple[str, int], float]
    result: EvalResult
    episodes: int  # meta-val episodes per domain and K the choice was made on


def choose_budget(val: EvalResult, test: EvalResult, *, val_domains: list[str], shots: list[int]) -> Budget:
    """``Budget`` from a meta-val and a meta-test ``evaluate_inits`` run of the same inits and adapt settings."""
    if val.curve_steps != test.curve_steps:
        raise ValueError(f"meta-val and meta-test curves differ in steps: {val.curve_steps} vs {test.curve_steps}")
    grid, steps, val_miou = val.curve_steps, {}, {}
    for init in init_names(val, no_adapt=False):
        for k in shots:
            per_step = [float(np.mean([val.curves[(d, init, k)][i].miou for d in val_domains]))
                        for i in range(len(grid))]
            best = max(range(len(grid)), key=lambda i: (per_step[i] if np.isfinite(per_step[i]) else -np.inf, -i))
            steps[(init, k)], val_miou[(init, k)] = grid[best], round(100 * per_step[best], 4)
    cut = {(d, init, k): scores[:grid.index(steps[(init, k)]) + 1] for (d, init, k), scores in test.curves.items()}
    n = min((len(val.curves[(d, i, k)][0].per_episode) for (d, i, k) in val.curves), default=0)
    return Budget(steps=steps, val_miou=val_miou, result=replace(test, curves=cut), episodes=n)


def meta_val_budget(dataset: PreparedDataset, episodes: dict[str, dict[int, list[Episode]]],
                    inits: dict[str, finetune.TrainedInit], test: EvalResult, *, val_domains: list[str],
                    shots: list[int], n: int, **evaluate_kw: Any) -> Budget:
    """Run the inits with the same rule on the first ``n`` stored episodes of each meta-val domain and K, and choose
    each init's step budget there (``choose_budget``)."""
    val_eps = {d: {k: eps[:n] for k, eps in episodes.get(d, {}).items()} for d in val_domains}
    val = evaluate_inits(dataset, val_eps, inits, domains=val_domains, shots=shots, **evaluate_kw)
    return choose_budget(val, test, val_domains=val_domains, shots=shots)


def budget_metrics(budget: Budget, *, domains: list[str], shots: list[int]) -> dict[str, float]:
    """``budget.<init>.shot<K>.{steps,val_miou}`` and ``budget.mean.<init>.shot<K>.{miou,fbiou}`` (meta-test)."""
    out: dict[str, float] = {}
    for (init, k), s in budget.steps.items():
        out[f"budget.{init}.shot{k}.steps"] = float(s)
        out[f"budget.{init}.shot{k}.val_miou"] = budget.val_miou[(init, k)]
    mean = metrics_dict(budget.result, domains=domains, shots=shots, no_adapt=False)
    out.update({f"budget.{key}": v for key, v in mean.items() if key.startswith("mean.")})
    return {k: v for k, v in out.items() if np.isfinite(v)}


def timings_dict(result: EvalResult) -> dict[str, float]:
    """The stage's timings.json (apart from the metrics): ``speed.{seconds,episodes,episodes_per_s}`` and
    ``speed.<init>.episodes_per_s``."""
    return {f"speed.{k}": round(v, 4) for k, v in result.speed.items() if np.isfinite(v)}


def shared_norm(inits: dict[str, finetune.TrainedInit]) -> tuple[list[float], list[float]]:
    """The one input normalisation every init expects (an episode is assembled once for all of them)."""
    norms = {name: init.norm for name, init in inits.items()}
    first = next(iter(norms.values()))
    for name, norm in norms.items():
        if norm != first:
            raise InputError(f"init '{name}' expects input normalisation {norm}, another init {first}: evaluate "
                             f"compares inits of one backbone (retrain after changing model.backbone)")
    return first


def load_inits(models: Path, algorithms: list[str], extra: list[str], device: torch.device, *, model: ModelConfig,
               train: TrainConfig, image_size: int, scratch_lr: float, seed: int) -> dict[str, finetune.TrainedInit]:
    """Each trained algorithm from ``models/<alg>.pt``, then the baselines named in ``extra`` (scratch, imagenet)."""
    inits: dict[str, finetune.TrainedInit] = {}
    for alg in algorithms:
        inits[alg] = finetune.load_init(models / f"{alg}.pt", device)
        if inits[alg].backbone != model.backbone:
            raise InputError(f"{models / f'{alg}.pt'}: trained with backbone {inits[alg].backbone}, but "
                             f"model.backbone is {model.backbone} (rerun the train stage)")
    for name in extra:
        if name not in inits:
            inits[name] = baseline_init(name, model=model, train=train, image_size=image_size,
                                        scratch_lr=scratch_lr, seed=seed)
    return inits
