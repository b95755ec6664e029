"""Several processes (gloo on CPU, two processes): the same weights as one process, one set of outputs, no hang.

The processes start with torch.multiprocessing.spawn and a file rendezvous (no port to collide), or, for the
stage, exactly as dvc.yaml runs it (the script relaunches itself under torchrun).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from meta_helpers import BACKBONE, SIZE, TinyDeepLab, TinyNet, make_fixture, task
from params_helpers import write_params

from metaseg import distributed
from metaseg.config import ALGORITHMS, AdaptConfig, BaseConfig, ModelConfig, TrainConfig
from metaseg.meta.algorithms import make_algorithm
from metaseg.models.deeplab import build_model

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
META_BATCH = 3  # uneven shares: rank 0 takes tasks 0 and 2, rank 1 task 1


def _spawn(fn, tmp: Path, *args, timeout_s: float = 300, backend: str = "gloo") -> list:
    """Run ``fn(rank, world, *args)`` in WORLD processes; returns what each returned."""
    mp.spawn(_entry, args=(fn, str(tmp / "rendezvous"), str(tmp), args, timeout_s, backend), nprocs=WORLD,
             join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _entry(rank: int, fn, init_file: str, out: str, args: tuple, timeout_s: float, backend: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=timeout_s))
    try:
        torch.save(fn(rank, WORLD, *args), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# --- one outer step: every algorithm -----------------------------------------------------------------------------
DEEPLAB = {"anil", "protonet"}  # they read DeepLab's body features: a tiny random one; the rest run TinyNet
# (l2o: TinyDeepLab, DeepLab's layout in miniature: its LSTM runs over the decoder's coordinates)


def _tasks(size: int, device: str) -> list[SimpleNamespace]:
    out = []
    for s in range(META_BATCH):
        x, y = task(2, 1, seed=s, size=size)
        x, y = x.double().to(device), y.to(device)
        out.append(SimpleNamespace(support_x=x[:1], support_y=y[:1], query_x=x[1:], query_y=y[1:], class_ids=(1,),
                                   domain=f"d{s % 2}"))  # l2o's contrastive term pairs tasks across processes
    return out


def _two_steps(name: str, rank: int, world: int, device: str = "cpu") -> dict:
    """Two outer steps (Adam state and the clip act on the second) on this process's share of the meta-batch."""
    torch.manual_seed(0)
    net = (build_model(BACKBONE, backbone_weights=None) if name in DEEPLAB
           else TinyDeepLab() if name == "l2o" else TinyNet()).double().to(device)
    start = {k: v.detach().cpu().clone() for k, v in net.named_parameters()}
    algo = make_algorithm(name, net, inner_steps=1, inner_lr=0.1, outer_lr=0.01, outer_clip=0.05, aux_weight=0.0)
    tasks = _tasks(32 if name in DEEPLAB else 12, device)
    metrics = [algo.step(distributed.share(tasks, rank, world))]
    first_buffers = {k: v.clone() for k, v in net.named_buffers()}
    metrics.append(algo.step(distributed.share(tasks, rank, world)))
    cpu = lambda named: {k: v.detach().cpu().clone() for k, v in named}  # noqa: E731
    return {"params": cpu(net.named_parameters()), "start": start, "first_buffers": cpu(first_buffers.items()),
            "extra": cpu(algo.extra_parameters().items()), "buffers": cpu(net.named_buffers()), "metrics": metrics}


def _every_algorithm(rank: int, world: int) -> dict:
    return {name: _two_steps(name, rank, world) for name in ALGORITHMS}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], **tol) if tol else torch.equal(a[k], b[k])
                                        for k in a)


@pytest.fixture(scope="module")
def two_process_steps(tmp_path_factory) -> tuple[list[dict], dict]:
    ranks = _spawn(_every_algorithm, tmp_path_factory.mktemp("steps"))
    return ranks, _every_algorithm(0, 1)


@pytest.mark.parametrize("name", [a for a in ALGORITHMS if a != "transfer"])
def test_two_processes_take_the_single_process_step(name: str, two_process_steps) -> None:
    """Each process adapts its share of the tasks; the averaged meta-gradient (uneven shares 2 + 1) gives the
    single-process update: weights, learned rates and scale, loss and mIoU. The stored BN statistics stay as
    they were on every process (per-task statistics from each task's support set: nothing to synchronise)."""
    ranks, single = two_process_steps
    r0, r1, one = ranks[0][name], ranks[1][name], single[name]
    assert _same(r0["params"], r1["params"]) and _same(r0["extra"], r1["extra"])  # bit-identical processes
    # float64; the two Adam steps of lr 0.01 move weights by ~1e-2, the order of summation leaves < 1e-9
    assert _same(r0["params"], one["params"], rtol=0, atol=1e-9) and _same(r0["extra"], one["extra"], rtol=0,
                                                                             atol=1e-9)
    assert not _same(r0["params"], r0["start"], rtol=0, atol=1e-3)  # it did step
    assert _same(r0["buffers"], one["buffers"]) and _same(r1["buffers"], one["buffers"])
    for a, b in zip(r0["metrics"], one["metrics"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-9) and a["miou"] == pytest.approx(b["miou"], rel=1e-9)


def _maml_family_on_gpus(rank: int, world: int) -> dict:
    return {name: _two_steps(name, rank, world, device=f"cuda:{rank}") for name in ("maml", "reptile", "metasgd")}


@pytest.mark.gpu
def test_nccl_on_two_gpus_takes_the_single_gpu_step(tmp_path) -> None:
    """The same property on the CUDA path: nccl, one process per GPU, against one process on GPU 0."""
    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} CUDA GPUs (torch.cuda.device_count() is {torch.cuda.device_count()})")
    ranks = _spawn(_maml_family_on_gpus, tmp_path, backend="nccl")
    single = {name: _two_steps(name, 0, 1, device="cuda:0") for name in ranks[0]}
    for name, one in single.items():
        assert _same(ranks[0][name]["params"], ranks[1][name]["params"]), name
        assert _same(ranks[0][name]["params"], one["params"], rtol=0, atol=1e-9), name


def test_transfer_averages_like_data_parallel_and_keeps_processes_in_step(two_process_steps) -> None:
    """Transfer is plain supervised training: with two processes each normalises its own images in train-mode BN
    and weighs its own pixels in the class-balanced loss (as DistributedDataParallel without SyncBatchNorm), so
    its weights are near, not equal to, one process's. The processes stay identical (weights and BN running
    statistics), and after the first step the averaged running mean is the single-process one."""
    ranks, single = two_process_steps
    r0, r1, one = ranks[0]["transfer"], ranks[1]["transfer"], single["transfer"]
    assert _same(r0["params"], r1["params"]) and _same(r0["buffers"], r1["buffers"])
    means = [k for k in one["buffers"] if k.endswith("running_mean")]
    assert means and _same({k: r0["first_buffers"][k] for k in means}, {k: one["first_buffers"][k] for k in means},
                           rtol=0, atol=1e-12)
    assert all(r0["first_buffers"][k].abs().max() > 1e-3 for k in means)  # BN did move (from zeros)
    for k, v in r0["params"].items():  # near: off by under a tenth of the two steps' move (measured: ~5 %)
        assert (v - one["params"][k]).abs().max() <= 0.1 * (v - r0["start"][k]).abs().max() + 1e-9, k


def test_shares_are_disjoint_and_cover_the_meta_batch() -> None:
    for n in range(1, 8):
        for world in range(1, n + 1):
            shares = [distributed.share(list(range(n)), r, world) for r in range(world)]
            assert sorted(i for s in shares for i in s) == list(range(n)) and all(shares)


def _one_goes_silent(rank: int, world: int) -> str | None:
    if rank == 1:
        time.sleep(6)  # alive but not answering (a hung GPU, a stalled node)
        return None
    t0 = time.monotonic()
    try:
        distributed.world_sum([1.0])
    except distributed.ProcessGroupError as err:
        return f"{time.monotonic() - t0:.1f}|{err}"
    return None


def test_a_silent_process_ends_the_wait_with_one_line_after_the_timeout(tmp_path) -> None:
    """A process that stops answering (without dying, so no launcher notices) ends the others' wait after the
    process-group timeout (train.timeout_s), with one line naming the rank and the setting."""
    took, message = _spawn(_one_goes_silent, tmp_path, timeout_s=2)[0].split("|", 1)
    assert float(took) < 7
    assert message.startswith("rank 0: summing the step's metrics failed: another process stopped or did not "
                              "answer within the timeout (train.timeout_s): ") and "\n" not in message


# --- the train loop: same weights as one process, resume ----------------------------------------------------------
BASE = BaseConfig(seed=0, image_size=SIZE, device="cpu")
MODEL = ModelConfig(backbone="mobilenet_v3_large", backbone_weights=None, bn_stats="support")
CFG = TrainConfig(iterations=3, meta_batch=2, shots=1, queries=1, inner_steps=1, inner_lr=1e-4, outer_lr=1e-3,
                  val_every=3, val_episodes=1, checkpoint_every=1, augment=True)
ADAPT = AdaptConfig(steps=1, lr=1e-4, optimizer="sgd")


def _train(data: Path, run: Path, cfg: TrainConfig, **kw) -> dict | None:
    from metaseg.train import train

    return train("fomaml", prepared=data / "prepared", splits=data / "splits", out=run / "init.pt",
                 checkpoints=run / "ck", results=run / "results", base=BASE, model_cfg=MODEL, cfg=cfg,
                 adapt_cfg=ADAPT, **kw)


def _train_worker(rank: int, world: int, data: str) -> dict:
    data = Path(data)
    cfg = CFG.model_copy(update={"nproc": world})
    full = _train(data, data / "full", cfg)
    stopped = _train(data, data / "part", cfg, stop_after=1)
    resumed = _train(data, data / "part", cfg)
    return {"full": full, "stopped": stopped, "resumed": resumed}


@pytest.mark.slow
def test_train_on_two_processes_writes_once_and_resumes(tmp_path) -> None:
    """The train loop on two processes: rank 0 alone writes (and returns the metrics), the weights equal a
    one-process run's, and a run stopped after iteration 1 and resumed lands on the uninterrupted weights."""
    make_fixture(tmp_path)
    ranks = _spawn(_train_worker, tmp_path, str(tmp_path))
    assert ranks[0]["full"] is not None and ranks[1]["full"] is None and ranks[0]["stopped"] is None
    _train(tmp_path, tmp_path / "single", CFG)
    last = {run: torch.load(tmp_path / run / "ck" / "last.pt", weights_only=False)
            for run in ("full", "part", "single")}
    full, part, single = (last[r]["algorithm"]["model"] for r in ("full", "part", "single"))
    assert _same(full, part)  # resumed on two processes: bit-exact
    assert _same(full, single, rtol=1e-5, atol=1e-6)  # two processes vs one: float summation order only
    assert isinstance(last["full"]["torch_rng"], list) and len(last["full"]["torch_rng"]) == WORLD
    for run in ("full", "part"):  # one row per iteration: one writer, and the resume rebuilt the curve
        rows = (tmp_path / run / "results" / "plots" / "metrics" / "loss.tsv").read_text().split()
        assert rows[2::2] == ["1", "2", "3"], run
    assert ranks[0]["full"]["best_val_miou"] == torch.load(tmp_path / "full" / "init.pt",
                                                           weights_only=False)["val_miou"]


# --- the stage as dvc runs it -------------------------------------------------------------------------------------
def _workspace(tmp: Path, **train: object) -> tuple[Path, dict[str, str]]:
    """A DVC project with the repository's dvc.yaml and code, a tiny dataset and params for one fomaml stage."""
    make_fixture(tmp)
    for name in ("prepared", "splits"):
        (tmp / "data").mkdir(exist_ok=True)
        shutil.move(tmp / name, tmp / "data" / name)
    shutil.copy(ROOT / "dvc.yaml", tmp / "dvc.yaml")
    for name in ("pipeline", "src", "export"):
        (tmp / name).symlink_to(ROOT / name)
    write_params(tmp / "params.yaml", base={"image_size": SIZE, "device": "cpu"}, model=MODEL.model_dump(),
                 splits={"meta_val": ["c"], "meta_test": ["d"], "shots": [1]},
                 train={**{k: v for k, v in CFG.model_dump().items()}, "algorithms": ["fomaml"], "iterations": 2,
                        "val_every": 2, **train},
                 adapt=ADAPT.model_dump())
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}", "NO_ALBUMENTATIONS_UPDATE": "1",
           "OMP_NUM_THREADS": "1"}
    return tmp, env


@pytest.mark.slow
def test_dvc_repro_of_the_train_stage_on_two_processes(tmp_path) -> None:
    """`dvc repro` runs dvc.yaml's own command; with train.nproc: 2 it relaunches under torchrun, and the stage
    completes with one set of outputs (one writer: no duplicate log rows, no per-rank files)."""
    ws, env = _workspace(tmp_path, nproc=2)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=ws, env=env, check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pipeline.validate", "--params", "params.yaml", "--out",
                    "results/validate/params.ok"], cwd=ws, env=env, check=True, timeout=120)
    proc = subprocess.run([*dvc, "repro", "--single-item", "train@fomaml"], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["train@fomaml"]
    assert lock["params"]["params.yaml"]["train.nproc"] == 2
    results = ws / "results" / "train" / "fomaml"
    assert (ws / "models" / "train" / "fomaml.pt").is_file()
    assert sorted(p.name for p in (ws / "models" / "checkpoints" / "fomaml").iterdir()) == ["best.pt", "last.pt"]
    assert (results / "metrics.json").is_file() and (results / "timings.json").is_file()
    rows = (results / "plots" / "metrics" / "loss.tsv").read_text().split()
    assert rows[2::2] == ["1", "2"]
    ck = torch.load(ws / "models" / "checkpoints" / "fomaml" / "last.pt", weights_only=False)
    assert ck["complete"] and len(ck["torch_rng"]) == 2  # written by the two-process run


@pytest.mark.slow
def test_a_dead_process_stops_the_run_with_an_error_not_a_hang(tmp_path) -> None:
    """Rank 1 dies in its first outer step: the stage (torchrun under it) exits non-zero within seconds and
    says which process failed, instead of rank 0 waiting forever in the all-reduce."""
    ws, env = _workspace(tmp_path, nproc=2, timeout_s=60)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch.distributed as dist\n"
        "    real, calls = dist.all_reduce, [0]\n"
        "    def dying(*a, **k):\n"
        "        calls[0] += 1\n"
        "        if calls[0] == 3:\n"
        "            os._exit(3)\n"
        "        return real(*a, **k)\n"
        "    dist.all_reduce = dying\n")
    env["PYTHONPATH"] = f"{hook}{os.pathsep}{env['PYTHONPATH']}"
    cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["do"]["cmd"].replace("${item}", "fomaml")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, shell=True, cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "exitcode  : 3" in out and "rank      : 1" in out, out[-3000:]  # torchrun names the failed process
    assert took < 240, took
    assert not (ws / "models" / "train" / "fomaml.pt").exists()


def test_nnodes_without_torchrun_is_one_line_before_any_work(tmp_path) -> None:
    """Several machines cannot be started by one `dvc repro`: exit 2, one line pointing at the README."""
    ws, env = _workspace(tmp_path, nproc=1, nnodes=2)
    cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["do"]["cmd"].replace("${item}", "fomaml")
    proc = subprocess.run(cmd, shell=True, cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith("error: 'train.nnodes': 2 machines run one torchrun each")
    assert not (ws / "models").exists()
