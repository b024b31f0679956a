"""One typed configuration: pydantic models, YAML loading and `--set a.b=value` overrides.

Every key has a type, a default and a one-line description (`Field(description=...)`); the README's
config reference is generated from these models. Unknown keys are errors, and every error names the
key, the value seen and the file: `train.lr must be > 0, got -0.1 (configs/covid_xray.yaml)`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medres.errors import ConfigInvalid


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    manifest: Path | list[Path] | None = Field(None, description="CSV manifest (path,label|labels|one column per class,patient_id[,split,...]), or a list of them merged (each row keeps its `source`).")
    root: Path | None = Field(None, description="Folder the manifest paths are relative to (default: each manifest's own folder).")
    classes: list[str] = Field(default_factory=list, description="Class names, in output order.")
    task: Literal["multiclass", "multilabel"] = Field("multiclass", description="One label per image, or any subset of classes.")
    uncertain: Union[Literal["ones", "zeros", "ignore"], dict[str, Literal["ones", "zeros", "ignore"]]] = Field(
        "ignore", description="Uncertain (-1) labels: ones, zeros or ignore (masked), or per class {CLASS: policy, default: policy}; blank labels are always masked.")
    views: list[str] = Field(default_factory=list, description="Keep only rows whose `view` column is one of these (e.g. [PA, AP]); [] keeps all.")
    filter: list[str] = Field(default_factory=list, description="Row filters on manifest columns, all applied: 'COLUMN OP VALUE' with OP one of == != < <= > >= in (e.g. 'age >= 18', 'sex in [F, M]').")
    split_column: str | None = Field(None, description="Column with an archive's official split (train/val/test); train rows lend val_fraction of their patients to val when it has none, and test_fraction to test likewise.")
    image_size: int = Field(224, ge=16, le=2048, description="Square model input size in pixels.")
    resize: Literal["letterbox", "crop", "stretch"] = Field("letterbox", description="letterbox keeps the aspect ratio and pads; crop centre-crops; stretch distorts.")
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="Share of patients for validation when the manifest has no split column.")
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="Share of patients for test when the manifest has no split column.")
    group_by: str = Field("patient_id", description="Manifest column whose values never cross splits.")
    cache_dir: Path | None = Field(None, description="Optional per-file cache of decoded+resized float32 images, shared with predict/report (None: off).")
    store_dir: Path | None = Field(None, description="Where the decoded-image store lives (None: $MEDRES_STORE_DIR, else ~/.cache/medres/store); needs N x image_size^2 bytes (uint8).")
    store_dtype: Literal["uint8", "uint16", "float32"] = Field("uint8", description="Stored pixel precision after the VOI/window step: uint8 (display precision), uint16, or float32.")
    voi: Union[Literal["auto", "none", "minmax"], int] = Field("auto", description="DICOM VOI policy: auto (file's first window/LUT, else percentiles), none, minmax, or a window index.")
    max_megapixels: float = Field(100.0, gt=0, description="Refuse images larger than this before allocating their pixels.")
    allow_leakage: bool = Field(False, description="Allow a patient or identical pixels in two splits (not recommended).")

    @model_validator(mode="after")
    def _fractions(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"data.val_fraction + data.test_fraction must be < 1, got {self.val_fraction} + {self.test_fraction}"
            )
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"data.classes has duplicates: {self.classes}")
        if isinstance(self.uncertain, dict):
            unknown = sorted(set(self.uncertain) - set(self.classes) - {"default"})
            if unknown:
                raise ValueError(f"data.uncertain names {unknown[0]!r}, which is not in data.classes {self.classes}")
        if self.uncertain != "ignore" and self.task == "multiclass":
            raise ValueError("data.uncertain applies to multilabel tasks (data.task: multilabel); a multiclass manifest has no uncertain labels")
        return self

    @property
    def manifests(self) -> list[Path]:
        """data.manifest as a list (one or several CSVs)."""
        if self.manifest is None:
            return []
        return list(self.manifest) if isinstance(self.manifest, list) else [self.manifest]


class ModelConfig(_Strict):
    weights: str = Field("imagenet", description="imagenet (torchvision file in $TORCH_HOME/hub/checkpoints), none, or a checkpoint path.")
    in_channels: Literal[1, 3] = Field(3, description="1: conv1 filters summed to one grey channel; 3: grey repeated to RGB.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before the classifier.")


class AugmentConfig(_Strict):
    """train.augment as a mapping: one entry per transform. Defaults are today's chest-X-ray-safe recipe."""

    rotation: float = Field(7.0, ge=0, le=45, description="Rotation in degrees, uniform in ±rotation (0: off).")
    scale: tuple[float, float] = Field((0.92, 1.08), description="Zoom factor range [low, high], uniform; [1, 1]: off.")
    translate: float = Field(0.06, ge=0, le=0.5, description="Shift as a fraction of the image side, uniform in ±translate per axis (0: off).")
    brightness: float = Field(0.08, ge=0, le=1, description="Added intensity, uniform in ±brightness (pixels in [0, 1]; 0: off).")
    contrast: float = Field(0.12, ge=0, lt=1, description="Contrast factor around the image mean, uniform in 1 ± contrast (0: off).")
    gamma: float = Field(0.15, ge=0, le=1, description="Gamma exp(u), u uniform in ±gamma (0: off).")
    noise: float = Field(0.0, ge=0, le=0.5, description="Std of added Gaussian noise (pixels in [0, 1]; 0: off).")
    hflip: bool = Field(False, description="Random left-right flips; off for chest films: laterality matters (the heart is on the patient's left).")
    vflip: bool = Field(False, description="Random up-down flips; off for chest films: an upside-down chest is not a plausible radiograph.")

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0 < lo <= hi <= 2:
            raise ValueError(f"train.augment.scale must be [low, high] with 0 < low <= high <= 2, got [{lo}, {hi}]")
        return v

    @classmethod
    def off(cls) -> "AugmentConfig":
        """Every transform switched off (train.augment: false)."""
        return cls(rotation=0, scale=(1.0, 1.0), translate=0, brightness=0, contrast=0, gamma=0, noise=0, hflip=False, vflip=False)

    @property
    def enabled(self) -> bool:
        return self != AugmentConfig.off()

    def describe(self) -> str:
        """One line for augment.png and the model card: each entry and its strength."""
        if not self.enabled:
            return "off (train.augment: false)"
        lo, hi = self.scale
        entries = [("rotation", self.rotation, f"±{self.rotation:g}°"), ("scale", (lo, hi) != (1, 1), f"{lo:g}–{hi:g}"),
                   ("translate", self.translate, f"±{self.translate:g}"), ("brightness", self.brightness, f"±{self.brightness:g}"),
                   ("contrast", self.contrast, f"±{self.contrast:g}"), ("gamma", self.gamma, f"log ±{self.gamma:g}"),
                   ("noise", self.noise, f"std {self.noise:g}"), ("hflip", self.hflip, "on"), ("vflip", self.vflip, "on")]
        return ", ".join(f"{name} {text if on else 'off'}" for name, on, text in entries)


def with_legacy_hflip(train: dict) -> dict:
    """A `train:` mapping with the pre-mapping key train.hflip folded into train.augment, so older
    configs and run folders load: true turns on augment.hflip unless augmentation is off."""
    if "hflip" not in train:
        return train
    train = dict(train)
    hflip, augment = train.pop("hflip"), train.get("augment", True)
    if hflip is True and augment is not False:
        train["augment"] = {**(augment if isinstance(augment, dict) else {}), "hflip": True}
    return train


def augment_settings(value: "bool | dict | AugmentConfig") -> AugmentConfig:
    """train.augment as written (true, false or a mapping of overrides) → every entry resolved."""
    if isinstance(value, AugmentConfig):
        return value
    if isinstance(value, dict):
        return AugmentConfig.model_validate(value)
    return AugmentConfig() if value else AugmentConfig.off()


def _augment_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = "train.augment." + ".".join(str(p) for p in e["loc"][:1])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{key} is not an augmentation entry (entries: {', '.join(AugmentConfig.model_fields)})")
        elif msg.startswith("train."):
            lines.append(msg)
        else:
            lines.append(f"{key} {_lower_first(msg)}, got {e.get('input')!r}")
    return "; ".join(lines)


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1, description="Number of epochs.")
    batch_size: int = Field(32, ge=1, description="Images per step (per process under DDP).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of the head; the backbone uses lr * backbone_lr_mult.")
    backbone_lr_mult: float = Field(0.1, gt=0, le=1.0, description="Discriminative LR: backbone LR as a fraction of lr.")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay (decoupled under AdamW, L2 under SGD).")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw, or sgd (with train.momentum and train.nesterov).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (train.optimizer: sgd).")
    nesterov: bool = Field(False, description="Nesterov momentum (train.optimizer: sgd, momentum > 0).")
    schedule: Literal["cosine", "onecycle", "step"] = Field("cosine", description="LR schedule per step: cosine (warm-up then cosine to 0), onecycle (cosine up from lr/25 over the warm-up, or 30% of steps without one, then cosine down to lr/25e4), step (warm-up, then x step_gamma every step_epochs).")
    step_epochs: float = Field(3.0, gt=0, description="train.schedule step: epochs between LR drops.")
    step_gamma: float = Field(0.1, gt=0, le=1, description="train.schedule step: factor applied to the LR at each drop.")
    ema: float | None = Field(None, gt=0, lt=1, description="Exponential moving average of the weights with this decay, updated each step and validated each epoch; the better of live and EMA weights becomes the best checkpoint (None: off).")
    freeze_epochs: int = Field(1, ge=0, description="Epochs training only the head (linear probe) before unfreezing.")
    warmup_epochs: float = Field(0.5, ge=0, description="Linear warm-up length before the cosine or step decay; under onecycle, the rise from lr/25 to lr.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing for the loss.")
    balance: Literal["none", "weights", "sampler"] = Field("weights", description="Class imbalance: class-weighted loss, balanced sampler, or none.")
    augment: Union[bool, AugmentConfig] = Field(True, description="Chest-X-ray-safe augmentation: true (rotation, scale, translate, brightness, contrast, gamma; no flips), false (none), or a mapping overriding single entries of train.augment.*.")
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm (0: off).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 autocast on CPUs that support it natively (not with $MEDRES_NO_BF16=1), bf16/fp16 on CUDA.")
    channels_last: bool = Field(True, description="Use the channels_last memory format.")
    seed: int = Field(0, description="Seed for splits, initialisation, augmentation and sampling.")
    deterministic: bool = Field(False, description="Deterministic kernels (slower) so --resume equals an uninterrupted run.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N.")
    num_workers: int | None = Field(None, ge=0, description="Threads decoding images into the store (None: one per core, 2 to 4; 0: in-process).")
    loader_workers: int | None = Field(None, ge=0, description="DataLoader processes reading training batches from the store (None: 0 on CPU, where a reader process takes a core from the model; 4 on CUDA).")
    unlabeled: Path | None = Field(None, description="Unlabelled films (a manifest with a path column, or a folder) added to training with FixMatch-style pseudo-labels; validation and test stay labelled.")
    unlabeled_ratio: int = Field(1, ge=1, description="Unlabelled films per labelled film in each step (FixMatch's mu).")
    pseudo_threshold: float = Field(0.95, gt=0.5, lt=1.0, description="Confidence a film's weak view needs before its pseudo-label enters the loss (multilabel: per label, p >= t or p <= 1 - t).")
    unlabeled_weight: float = Field(1.0, ge=0, description="Weight of the unlabelled (pseudo-label) loss.")
    early_stopping: int = Field(0, ge=0, description="Stop after this many epochs without a better validation AUROC (0: off).")
    max_steps_per_epoch: int = Field(0, ge=0, description="Cap on steps per epoch (0: all); for smoke tests.")
    calibrate: bool = Field(True, description="Fit temperature scaling, operating points, conformal sets and the input gate on held-out data at the end.")
    log_to: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list, description="Experiment trackers (pip install 'medres[tracking]'): tensorboard writes RUN/tensorboard; mlflow logs params, per-epoch metrics, checkpoint and card.")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (None: sqlite:///RUN/mlflow.db with artifacts in RUN/mlartifacts; or your server's URI).")

    @model_validator(mode="before")
    @classmethod
    def _legacy_hflip(cls, data: Any) -> Any:
        return with_legacy_hflip(data) if isinstance(data, dict) else data

    @field_validator("augment", mode="before")
    @classmethod
    def _augment(cls, v: Any) -> Any:
        if isinstance(v, (bool, AugmentConfig)):
            return v
        if isinstance(v, dict):  # validated here, so a bad entry is one line naming train.augment.KEY
            try:
                return AugmentConfig.model_validate(v)
            except ValidationError as err:
                raise ValueError(_augment_error(err)) from None
        raise ValueError(f"train.augment must be true, false or a mapping of entries ({', '.join(AugmentConfig.model_fields)}), got {v!r}")

    @property
    def augmentation(self) -> AugmentConfig:
        """train.augment with every entry resolved."""
        return augment_settings(self.augment)

    @model_validator(mode="after")
    def _freeze(self) -> "TrainConfig":
        if self.freeze_epochs > self.epochs:
            raise ValueError(f"train.freeze_epochs must be <= train.epochs, got {self.freeze_epochs} > {self.epochs}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError(f"train.nesterov needs train.optimizer: sgd and train.momentum > 0, got optimizer {self.optimizer}, momentum {self.momentum}")
        return self


class EvalConfig(_Strict):
    target_sensitivity: float | None = Field(None, gt=0, lt=1, description="Operating point at this sensitivity on validation (default: Youden's J).")
    bootstrap: int = Field(1000, ge=0, description="Patient-level bootstrap resamples for 95% CIs.")
    coverage: float = Field(0.9, gt=0, lt=1, description="Target coverage of the conformal prediction sets fitted on validation.")
    conformal: Literal["aps", "lac"] = Field("aps", description="Conformal score (multiclass): aps (adaptive sets) or lac (smallest sets); multilabel uses per-label thresholds.")
    ood_quantile: float = Field(0.99, gt=0.5, lt=1, description="OOD gate threshold: this quantile of the validation images' OOD scores (about 1 - q of in-distribution images flagged).")
    ood_max_train: int = Field(20000, ge=0, description="Training images (a seeded sample) the OOD detector is fitted on (0: no detector).")
    orientation_images: int = Field(512, ge=0, description="Training images (a seeded sample) shown in 8 orientations/polarities to fit the ROTATED/INVERTED check (0: no check).")


class PretrainConfig(_Strict):
    epochs: int = Field(10, ge=1, description="medres pretrain: epochs over the unlabelled films.")
    max_steps_per_epoch: int = Field(0, ge=0, description="Cap on pretraining steps per epoch (0: all).")
    batch_size: int = Field(32, ge=2, description="Films per pretraining step (two views each).")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the backbone and projector.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    projector_dim: int = Field(1024, ge=16, description="Width of VICReg's projector (2048 → dim → dim).")
    noise: float = Field(0.02, ge=0, description="Std of the Gaussian noise added to each view (pixels in [0, 1]).")
    same_patient: bool = Field(True, description="MedAug pairs: half of the second views are another film of the same patient_id.")
    variance_weight: float = Field(25.0, ge=0, description="VICReg's variance weight (the guard against collapse; 0 lets it collapse).")
    covariance_weight: float = Field(1.0, ge=0, description="VICReg's covariance weight (decorrelates the embedding dimensions).")


class Config(_Strict):
    name: str = Field("medres-run", description="Run name, used in the run folder.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\\0"):
            raise ValueError(f"name must be a non-empty file-name-safe string, got {v!r}")
        return v

    def digest(self) -> str:
        """sha256 of the resolved config (for the checkpoint metadata)."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if k == "augment" and isinstance(nxt, bool):  # --set train.augment.rotation=3 on `augment: true|false`
            nxt = node[k] = {} if nxt else AugmentConfig.off().model_dump(mode="json")
        if not isinstance(nxt, dict):
            raise ConfigInvalid(f"{dotted}: {k} is not a section ({source})")
        node = nxt
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` → ("a.b", value parsed as YAML so numbers, booleans and lists get their type)."""
    if "=" not in item:
        raise ConfigInvalid(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigInvalid(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key {key} ({source})")
        elif e["type"] == "missing":
            lines.append(f"{key} is required ({source})")
        elif key != "(top level)" and msg.startswith(key.split(".")[0]):
            lines.append(f"{msg} ({source})")
        else:
            lines.append(f"{key} {_lower_first(msg)}, got {e.get('input')!r} ({source})")
    return "; ".join(lines)


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def config_from_dict(tree: dict, source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigInvalid(_format_error(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply `--set` overrides, validate, resolve relative paths.

    Relative input paths (data.manifest, data.root, model.weights) are resolved against the current
    directory when they exist there, else against the config file's folder (so a config works from the
    repo root and from its folder). data.cache_dir, an output, stays relative to the current directory.
    """
    tree: dict = {}
    source = "<defaults>"
    base: Path | None = None
    if path is not None:
        path = find_config(path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigInvalid(f"not valid YAML ({source}): {str(exc).splitlines()[0]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigInvalid(f"top level must be a mapping, got {type(loaded).__name__} ({source})")
        tree = loaded
        base = path.resolve().parent
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value, f"--set {key}")
    cfg = config_from_dict(tree, source + (" + --set" if overrides else ""))
    # Inputs: resolved against the config's folder when they do not exist here, then made absolute so a
    # run's recorded config works from any folder. cache_dir and store_dir (outputs) stay as given.
    resolve = lambda v: _resolve_input(v, base)  # noqa: E731
    if isinstance(cfg.data.manifest, list):
        cfg.data.manifest = [resolve(v) for v in cfg.data.manifest]
    elif cfg.data.manifest is not None:
        cfg.data.manifest = resolve(cfg.data.manifest)
    if cfg.data.root is not None:
        cfg.data.root = resolve(cfg.data.root)
    if cfg.train.unlabeled is not None:
        cfg.train.unlabeled = resolve(cfg.train.unlabeled)
    w = cfg.model.weights
    if w not in ("imagenet", "none") and not Path(w).is_absolute() and not Path(w).exists() and base is not None:
        if (base / w).exists():
            cfg.model.weights = str(base / w)
    return cfg


def shipped_config_dir() -> Path:
    """The folder of the YAML files shipped with medres: the installed package `medres.configs`, or the
    repository's configs/ in a source checkout (editable install)."""
    try:
        from importlib.resources import files

        installed = Path(str(files("medres.configs")))
        if installed.is_dir():
            return installed
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "configs"


def shipped_configs() -> dict[str, Path]:
    """Name (file stem) → path of every shipped config."""
    folder = shipped_config_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def find_config(path: str | Path) -> Path:
    """A config file: the path as given when it exists, else the shipped config of that name
    (`covid_xray.yaml` or `covid_xray`)."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if len(path.parts) == 1 and name in shipped:
        return shipped[name]
    raise ConfigInvalid(f"config file not found: {path} (shipped configs: {', '.join(shipped) or 'none'}; list them with medres configs)")


def config_summary(path: Path) -> str:
    """The first comment line of a config file: what `medres configs` prints beside its name."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def _resolve_input(value: Path, base: Path | None) -> Path:
    if not value.is_absolute() and not value.exists() and base is not None and (base / value).exists():
        value = base / value
    return value.resolve() if value.exists() else value


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_reference() -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every key, for the README and its test."""
    rows = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, key + ".")
                continue
            nested = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
            default = f.get_default(call_default_factory=True)
            tname = str(ann).replace("typing.", "").replace("pathlib.", "").replace("<class '", "").replace("'>", "").replace("medres.config.", "")
            rows.append((key, tname, json.dumps(default, default=str), f.description or ""))
            for sub in nested:  # train.augment: true | false | a mapping whose entries are listed too
                walk(sub, key + ".")

    walk(Config, "")
    return rows
