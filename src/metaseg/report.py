"""The `evaluate` stage's human-facing outputs: DVC plot data, overlay PNG grids and report.md with the claim check.

All numbers are percent. The winner of a row is the init with the highest mIoU (accumulated, the CD-FSS metric);
"separate" / "overlap" compares the 95% CIs of the per-episode mean of the winner and the runner-up. The claim
check compares the best meta-learning algorithm with each baseline (`transfer`, and `imagenet` when evaluated) at
1-shot (or the smallest K). The best algorithm is the one with the highest meta-val score (``val_miou`` of its
trained init, the number train chose its checkpoint on), never picked on the test episodes. Every init runs on the
same episodes, so gap and verdict come from one paired statistic: the per-episode difference (episodes of all
meta-test domains pooled), its mean and 95% CI. The claim holds when that mean is >= 5 points and the CI lies
above zero.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from metaseg.adapt import IMAGENET_INIT
from metaseg.data.prepared import IGNORE
from metaseg.evaluate import NOADAPT, Budget, EvalResult, Overlay
from metaseg.scoring import Interval, mean_ci
from metaseg.io import atomic_path, write_text
from metaseg.overlay import blend

log = logging.getLogger(__name__)

CLAIM_POINTS = 5.0
BASELINE = "transfer"
CLAIM_BASELINES = (BASELINE, IMAGENET_INIT)  # compared with the best meta-learning algorithm, when evaluated


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _pct(v: float) -> float:
    return round(100 * v, 4)


def write_plot_data(result: EvalResult, plots: Path, *, domains: list[str], shots: list[int],
                    inits: list[str]) -> None:
    """Long-format CSVs for DVC plots (a ``series`` column names each line; see docs/plots/series_linear.json).

    curve.csv: series, init, shot, step, miou (mean over domains after each of ``curve_steps``); shots.csv: series,
    init, shot, miou (after all steps, and ``<init>_noadapt``); domains.csv: domain, init, shot, miou, label.
    """
    curve_rows, shot_rows, domain_rows = [], [], []
    for init in inits:
        for k in shots:
            for i, s in enumerate(result.curve_steps):
                v = np.mean([result.curves[(d, init, k)][i].miou for d in domains])
                curve_rows.append([f"{init} {k}-shot", init, k, s, _pct(v)])
    for init in inits + [f"{n}{NOADAPT}" for n in inits]:
        shot_rows += [[init, init, k, _pct(np.mean([result.final(d, init, k).miou for d in domains]))] for k in shots]
        domain_rows += [[d, init, k, _pct(result.final(d, init, k).miou), f"{d} / {init} / {k}-shot"]
                        for d in domains for k in shots]
    _write_csv(plots / "curve.csv", ["series", "init", "shot", "step", "miou"], curve_rows)
    _write_csv(plots / "shots.csv", ["series", "init", "shot", "miou"], shot_rows)
    _write_csv(plots / "domains.csv", ["domain", "init", "shot", "miou", "label"], domain_rows)


def write_overlays(overlays: list[Overlay], path: Path, *, columns: dict[str, str]) -> None:
    """Grid: rows = query images; columns image | ground truth | one prediction per ``columns`` (title -> init)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = ["image", "ground truth", *columns]
    fig, axes = plt.subplots(len(overlays), len(titles), figsize=(2.2 * len(titles), 2.2 * len(overlays)),
                             squeeze=False)
    for r, ov in enumerate(overlays):
        lut = np.zeros(256, dtype=np.uint8)  # episode labels -> domain class ids, so a class keeps its colour
        lut[IGNORE] = IGNORE
        lut[1:len(ov.class_ids) + 1] = ov.class_ids
        panels = [ov.image, blend(ov.image, lut[ov.target]),
                  *(blend(ov.image, lut[ov.preds[init]]) for init in columns.values())]
        for c, panel in enumerate(panels):
            axes[r][c].imshow(panel)
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
            if r == 0:
                axes[r][c].set_title(titles[c], fontsize=8)
        axes[r][0].set_ylabel(ov.caption, fontsize=7)
    fig.suptitle(f"{overlays[0].domain}, {overlays[0].shot}-shot queries", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def _pooled(result: EvalResult, domains: list[str], init: str, k: int) -> np.ndarray:
    """Per-episode mIoU of every domain's episodes, concatenated (NaN = episode with nothing to score)."""
    return np.concatenate([np.asarray(result.final(d, init, k).per_episode) for d in domains])


def _mean_miou(result: EvalResult, domains: list[str], init: str, k: int) -> float:
    """The mean row's mIoU: each domain's accumulated mIoU, averaged over the domains (as ``metrics_dict``)."""
    return float(np.mean([result.final(d, init, k).miou for d in domains]))


def _pooled_ci(result: EvalResult, domains: list[str], init: str, k: int, ci_kw: dict[str, object]) -> Interval:
    """The mean row's CI: per-episode mIoU of all domains pooled (episodes with nothing to score left out)."""
    vals = _pooled(result, domains, init, k)
    vals = vals[~np.isnan(vals)]
    return mean_ci(vals, **ci_kw) if len(vals) else Interval(np.nan, np.nan, np.nan, 0, "t")  # type: ignore[arg-type]


def _fmt(iv: Interval) -> str:
    return f"{100 * iv.mean:.1f} ± {100 * iv.half_width:.1f}" if iv.n >= 2 else f"{100 * iv.mean:.1f} ± n/a"


def best_by_meta_val(meta_algs: list[str], meta_val: dict[str, float]) -> str | None:
    """The meta-learning algorithm with the highest meta-val score (NaN / missing scores never win; ties go to
    the first listed). None when no algorithm has a score."""
    scored = [a for a in meta_algs if np.isfinite(meta_val.get(a, np.nan))]
    return max(scored, key=lambda a: meta_val[a]) if scored else None


def claim_check(result: EvalResult, *, domains: list[str], shots: list[int], meta_algs: list[str],
                meta_val: dict[str, float], ci: str = "t", bootstrap_samples: int = 1000,
                seed: int = 0) -> tuple[str, dict[str, float]]:
    """The honest headline: the best meta-learning algorithm (chosen on meta-val) vs each baseline at 1-shot (or
    the smallest K); gap and CI from the paired per-episode difference."""
    k = 1 if 1 in shots else min(shots)
    evaluated = {i for (_, i, _) in result.curves}
    baselines = [b for b in CLAIM_BASELINES if b in evaluated]
    if BASELINE not in evaluated or not meta_algs:
        return f"Claim check not possible: needs `{BASELINE}` and at least one meta-learning algorithm.", {}
    best = best_by_meta_val(meta_algs, meta_val)
    if best is None:
        return ("Claim check not possible: no meta-learning algorithm has a meta-val score (models/train/<alg>.pt "
                "`val_miou`), and the best one is never picked on the test episodes."), {}
    kw = {"method": ci, "bootstrap_samples": bootstrap_samples, "seed": seed}
    lines, metrics = [], {}
    picked = ", ".join(f"`{a}` {meta_val[a]:.1f}" for a in meta_algs if np.isfinite(meta_val.get(a, np.nan)))
    b = _pooled(result, domains, best, k)
    for base in baselines:
        t = _pooled(result, domains, base, k)
        ok = ~np.isnan(b) & ~np.isnan(t)
        diff = mean_ci(100 * (b[ok] - t[ok]), **kw) if ok.any() else Interval(np.nan, np.nan, np.nan, 0, ci)
        above = diff.n >= 2 and diff.low > 0
        met = above and diff.mean >= CLAIM_POINTS
        why = []
        if not diff.mean >= CLAIM_POINTS:
            why.append(f"the mean gap is {diff.mean:+.1f} points, short of +{CLAIM_POINTS:.0f}")
        if not above:
            why.append("the CI reaches zero" if diff.n >= 2 else "fewer than 2 paired episodes")
        ci_text = f"[{diff.low:+.1f}, {diff.high:+.1f}]" if diff.n >= 2 else "n/a"
        lines.append(f"**Claim check ({k}-shot, {len(domains)} domain(s)): `{best}` vs `{base}`: paired per-episode "
                     f"difference {diff.mean:+.1f} mIoU points, 95% CI {ci_text} ({diff.n} episodes). Goal (>= "
                     f"+{CLAIM_POINTS:.0f} points, CI above zero): {'MET' if met else 'NOT MET'}.**"
                     + ("" if met else " Not met because " + " and ".join(why) + "."))
        prefix = "claim" if base == BASELINE else f"claim.{base}"
        metrics.update({f"{prefix}.delta_points": round(diff.mean, 4), f"{prefix}.ci_low": round(diff.low, 4),
                        f"{prefix}.met": float(met)})
    lines.append(f"`{best}` is the best meta-learning algorithm by meta-val score ({picked}), chosen before any "
                 f"test episode was seen.")
    return "\n\n".join(lines), {key: v for key, v in metrics.items() if np.isfinite(v)}


def report_markdown(result: EvalResult, *, domains: list[str], shots: list[int], inits: list[str],
                    meta_algs: list[str], meta_val: dict[str, float], no_adapt: bool, ci: str = "t",
                    bootstrap_samples: int = 1000, seed: int = 0) -> tuple[str, dict[str, float]]:
    """report.md text and the claim metrics."""
    claim, claim_metrics = claim_check(result, domains=domains, shots=shots, meta_algs=meta_algs,
                                       meta_val=meta_val, ci=ci,
                                       bootstrap_samples=bootstrap_samples, seed=seed)
    lines = ["# Evaluation report", "", claim, "",
             f"mIoU in percent after {result.steps} adaptation steps; in brackets the per-episode mean ± 95% CI "
             f"half-width ({ci}). Winner = highest mIoU; the last column compares its CI with the runner-up's. "
             f"Mean rows: mIoU averaged over domains, CI over the episodes of all domains pooled.", ""]
    kw = {"method": ci, "bootstrap_samples": bootstrap_samples, "seed": seed}
    lines += _table(result, domains, shots, inits, kw)
    if no_adapt:
        lines += ["", "## Without adaptation (step 0)", ""]
        lines += _table(result, domains, shots, [f"{i}{NOADAPT}" for i in inits], kw)
    failed = [f"{d}/{i}/{k}-shot: {n}" for (d, i, k), n in result.diverged.items() if n]
    if failed:
        lines += ["", f"**Warning: adaptation diverged (non-finite logits; scored as predicted) in episodes of "
                      f"{'; '.join(failed)}. Lower adapt.lr or the init's inner lr.**"]
    lines += ["", f"Episodes: {int(result.speed.get('episodes', 0))} per init; "
              f"{result.speed.get('episodes_per_s', 0):.2f} episodes/s (all inits) in "
              f"{result.speed.get('seconds', 0):.0f} s.", ""]
    return "\n".join(lines), claim_metrics


def budget_markdown(budget: Budget, fixed: EvalResult, *, domains: list[str], shots: list[int], inits: list[str],
                    meta_algs: list[str], ci: str = "t", bootstrap_samples: int = 1000,
                    seed: int = 0) -> tuple[str, dict[str, float]]:
    """The report section "at the step budget chosen on meta-val" and its claim metrics (``budget.claim*``)."""
    kw = {"method": ci, "bootstrap_samples": bootstrap_samples, "seed": seed}
    k_claim = 1 if 1 in shots else min(shots)
    lines = ["## At the step budget chosen on meta-val", "",
             f"Each init after the number of adaptation steps (0 to {fixed.steps}, on the curve's grid) that scored "
             f"best on the meta-val episodes ({budget.episodes} per domain and K), per init and K; the test episodes "
             f"never choose it. Mean over the meta-test domains, per-episode 95% CI pooled.", "",
             f"| init | K | steps (meta-val) | meta-val mIoU | meta-test mIoU | after {fixed.steps} steps |",
             "|---|---|---|---|---|---|"]
    for init in inits:
        for k in shots:
            if (init, k) not in budget.steps:
                continue
            iv = _pooled_ci(budget.result, domains, init, k, kw)
            at, full = _mean_miou(budget.result, domains, init, k), _mean_miou(fixed, domains, init, k)
            lines.append(f"| {init} | {k} | {budget.steps[(init, k)]} | {budget.val_miou[(init, k)]:.1f} | "
                         f"{100 * at:.1f} ({_fmt(iv)}) | {100 * full:.1f} |")
    meta_val = {a: budget.val_miou[(a, k_claim)] for a in meta_algs if (a, k_claim) in budget.steps}
    claim, metrics = claim_check(budget.result, domains=domains, shots=shots, meta_algs=meta_algs,
                                 meta_val=meta_val, ci=ci, bootstrap_samples=bootstrap_samples, seed=seed)
    lines += ["", claim.replace("by meta-val score", f"by meta-val score at its {k_claim}-shot budget"), ""]
    return "\n".join(lines), {f"budget.{key}": v for key, v in metrics.items()}


def _table(result: EvalResult, domains: list[str], shots: list[int], inits: list[str],
           ci_kw: dict[str, object]) -> list[str]:
    out = ["| domain | K | " + " | ".join(inits) + " | winner | CI vs runner-up |",
           "|---|---|" + "---|" * len(inits) + "---|---|"]
    for d in [*domains, "mean"]:
        for k in shots:
            miou: dict[str, float] = {}
            ivs: dict[str, Interval] = {}
            for i in inits:
                if d == "mean":
                    miou[i] = _mean_miou(result, domains, i, k)
                    ivs[i] = _pooled_ci(result, domains, i, k, ci_kw)
                else:
                    s = result.final(d, i, k)
                    miou[i], ivs[i] = s.miou, s.episode
            ranked = sorted(inits, key=lambda i: -miou[i])
            cells = [f"{100 * miou[i]:.1f} ({_fmt(ivs[i])})" for i in inits]
            if len(ranked) > 1:
                w, r = ranked[0], ranked[1]
                sep = "n/a" if ivs[w].n < 2 or ivs[r].n < 2 else ("overlap" if ivs[w].overlaps(ivs[r]) else "separate")
                tail = f"**{w}** (+{100 * (miou[w] - miou[r]):.1f} vs {r}) | {sep}"
            else:
                tail = f"**{ranked[0]}** | n/a"
            name = "**mean**" if d == "mean" else d
            out.append(f"| {name} | {k} | " + " | ".join(cells) + f" | {tail} |")
    return out


def write_report(path: Path, text: str) -> None:
    write_text(path, text)


def write_outputs(result: EvalResult, out: Path, *, domains: list[str], shots: list[int], inits: list[str],
                  meta_algs: list[str], meta_val: dict[str, float], no_adapt: bool, ci: str, bootstrap_samples: int,
                  seed: int, budget: Budget | None = None) -> dict[str, float]:
    """metrics.json, timings.json, report.md and plots/ (swapped in whole) under ``out``; returns the metrics.
    ``budget``: also the section and metrics at each init's step budget chosen on meta-val."""
    from metaseg.evaluate import budget_metrics, metrics_dict, timings_dict
    from metaseg.io import atomic_dir, write_json, write_timings

    metrics = metrics_dict(result, domains=domains, shots=shots, no_adapt=no_adapt)
    text, claim = report_markdown(result, domains=domains, shots=shots, inits=inits, meta_algs=meta_algs,
                                  meta_val=meta_val, no_adapt=no_adapt, ci=ci, bootstrap_samples=bootstrap_samples,
                                  seed=seed)
    metrics.update(claim)
    if budget is not None:
        section, budget_claim = budget_markdown(budget, result, domains=domains, shots=shots, inits=inits,
                                                meta_algs=meta_algs, ci=ci, bootstrap_samples=bootstrap_samples,
                                                seed=seed)
        text = text.rstrip("\n") + "\n\n" + section
        metrics.update(budget_metrics(budget, domains=domains, shots=shots))
        metrics.update(budget_claim)
    with atomic_dir(out / "plots") as plots:
        write_plot_data(result, plots, domains=domains, shots=shots, inits=inits)
        for d in domains:
            best = best_by_meta_val(meta_algs, meta_val)
            columns = {f"{best} (best meta)": best} if best else {}
            if BASELINE in inits:
                columns[BASELINE] = BASELINE
            if not columns and inits:  # no meta-learned init and no transfer: show what was evaluated
                columns[inits[0]] = inits[0]
            if result.overlays.get(d) and columns:
                write_overlays(result.overlays[d], plots / f"{d}_overlays.png", columns=columns)
    write_report(out / "report.md", text)
    write_json(out / "metrics.json", metrics)
    write_timings(out, timings_dict(result))
    return metrics
