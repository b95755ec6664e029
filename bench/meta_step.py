"""Meta-step cost on the same batches: fwd+bwd, FOMAML, MAML and l2o steps, and MAML with the `higher` library.

python bench/meta_step.py [--size 128] [--shots 2] [--queries 2] [--steps 2] [--reps 5] [--device auto]
    [--backbone mobilenet_v3_large] [--body-stage N] [--hidden 4]

Prints a markdown table. Every measurement runs in its own subprocess (same seed, same batch), so the peak RSS
column is that measurement's own. Goals: FOMAML step / ((k+1) x fwd+bwd) <= 1.10; MAML / higher-MAML <= 0.8.
`higher` is optional (`pip install higher`); without it that row reads "n/a (pip install higher)". The l2o row
(k = its unroll, LSTM with ``--hidden`` units over the decoder) is read as a ratio to the MAML step (k steps).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _setup(a: argparse.Namespace):
    import torch

    from metaseg.cli import choose_device
    from metaseg.models.deeplab import build_model

    device = torch.device(choose_device(a.device))
    torch.manual_seed(0)
    model = build_model(a.backbone, body_stage=a.body_stage).to(device)
    g = torch.Generator().manual_seed(1)
    n = a.shots + a.queries
    x = torch.randn(n, 3, a.size, a.size, generator=g)
    y = (torch.rand(n, a.size, a.size, generator=g) > 0.7).long()
    task = SimpleNamespace(support_x=x[:a.shots].to(device), support_y=y[:a.shots].to(device),
                           query_x=x[a.shots:].to(device), query_y=y[a.shots:].to(device), class_ids=(1,))
    return torch, device, model, task


def _time(torch, device, fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def phase(a: argparse.Namespace) -> dict:
    torch, device, model, task = _setup(a)
    from metaseg.meta.algorithms import make_algorithm
    from metaseg.meta.inner import forward, seg_loss, split_state, task_buffers

    if a.phase == "fwdbwd":  # one inner-loop-style step: eval-BN functional forward + grad w.r.t. all params
        params, buffers = split_state(model)
        tb = task_buffers(model, params, buffers, task.support_x)

        def fn() -> None:
            loss = seg_loss(forward(model, params, tb, task.support_x), task.support_y)
            torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    elif a.phase == "taskbn":  # the design's per-task BN statistics: one no-grad forward of the support set
        params, buffers = split_state(model)
        fn = lambda: task_buffers(model, params, buffers, task.support_x)  # noqa: E731
    elif a.phase in ("fomaml", "maml", "l2o"):
        algo = make_algorithm(a.phase, model, inner_steps=a.steps, inner_lr=1e-3, outer_lr=1e-6, aux_weight=0.0,
                              l2o={"unroll": a.steps, "hidden": a.hidden, "learned_lr": 1e-6})
        fn = lambda: algo.step([task])  # noqa: E731
    else:  # higher: the textbook MAML step (monkey-patched module, differentiable SGD)
        try:
            import higher
        except ImportError:
            return {"time": None}
        model.eval()
        opt = torch.optim.Adam(model.parameters(), lr=1e-6)
        inner = torch.optim.SGD(model.parameters(), lr=1e-3)

        def fn() -> None:
            opt.zero_grad()
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(a.steps):
                    diffopt.step(seg_loss(fmodel(task.support_x), task.support_y))
                seg_loss(fmodel(task.query_x), task.query_y).backward()
            opt.step()
    t = _time(torch, device, fn, a.reps)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"time": t, "rss_mb": rss, "gpu_mb": gpu, "device": str(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--queries", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="inner steps k")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--backbone", default="mobilenet_v3_large")
    p.add_argument("--body-stage", type=int, default=None, help="EfficientNet-Lite: where the body ends")
    p.add_argument("--hidden", type=int, default=4, help="l2o: LSTM hidden units per coordinate")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.phase:
        print(json.dumps(phase(a)))
        return
    res = {}
    for ph in ("fwdbwd", "taskbn", "fomaml", "maml", "l2o", "higher"):
        cmd = [sys.executable, __file__, "--phase", ph] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                                                           if k != "phase" and v is not None]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        res[ph] = json.loads(out)
    k1fb = (a.steps + 1) * res["fwdbwd"]["time"]
    fmt = lambda v, u="": "n/a" if v is None else f"{v:.3f}{u}"  # noqa: E731
    mem = lambda r: "n/a" if r.get("rss_mb") is None else f"{r['rss_mb']:.0f}" + (f" (GPU {r['gpu_mb']:.0f})" if r.get("gpu_mb") else "")  # noqa: E731
    higher_t = res["higher"]["time"]
    stage = "" if a.body_stage is None else f" (body to features[{a.body_stage}])"
    print(f"device {res['fwdbwd']['device']}, {a.backbone}{stage}, {a.size} px, support {a.shots}, "
          f"query {a.queries}, k = {a.steps}, median of {a.reps}\n")
    print("| measurement | time (s) | ratio | goal | peak RSS MB |")
    print("|---|---|---|---|---|")
    print(f"| fwd+bwd (support batch) | {fmt(res['fwdbwd']['time'])} | | | {mem(res['fwdbwd'])} |")
    fo, bn = res["fomaml"]["time"], res["taskbn"]["time"]
    print(f"| task BN statistics (no-grad fwd) | {fmt(bn)} | | | {mem(res['taskbn'])} |")
    print(f"| FOMAML step | {fmt(fo)} | {fo / k1fb:.2f} x (k+1)·fwd+bwd ({(fo - bn) / k1fb:.2f} without task BN) "
          f"| <= 1.10 | {mem(res['fomaml'])} |")
    ratio = "n/a (pip install higher)" if higher_t is None else f"{res['maml']['time'] / higher_t:.2f} x higher"
    print(f"| MAML step | {fmt(res['maml']['time'])} | {ratio} | <= 0.8 | {mem(res['maml'])} |")
    print(f"| MAML step with higher | {'n/a (pip install higher)' if higher_t is None else fmt(higher_t)} | | | {mem(res['higher'])} |")
    l2o = res["l2o"]["time"]
    print(f"| l2o step (LSTM, {a.hidden} hidden, decoder) | {fmt(l2o)} | {l2o / res['maml']['time']:.2f} x MAML "
          f"step | | {mem(res['l2o'])} |")


if __name__ == "__main__":
    main()
