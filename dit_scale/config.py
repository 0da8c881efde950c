"""Typed run configuration: OmegaConf structured dataclasses, YAML files with `base:`, CLI overrides.

    cfg = load_config("configs/quickstart.yaml", ["train.steps=100", "moe.top_k=1"])

A YAML file may name a `base:` file (path relative to itself) whose values it overrides. Unknown keys, wrong
types and invalid values raise `ConfigError` with one sentence naming the field and what is allowed, before any
process group or model exists. `save_config` writes the resolved config that a run (and its checkpoints) carry.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A user-fixable problem in the configuration (one sentence naming the field)."""


# --------------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    name: str = "DiT-S/2-8E2A"          # registry name: DiT-{XS,S,B,L,XL,G}/{2,4,8}[-{E}E{k}A]
    input_size: int = 32                # spatial size of the model input (latent or pixels)
    in_channels: int = 4
    num_classes: int = 1000
    class_dropout: float = 0.1          # label dropout for classifier-free guidance
    learn_sigma: bool = False           # DDPM only: predict the variance too (DiT's hybrid loss)
    qk_norm: bool = False
    depth: Optional[int] = None         # overrides of the registry size (None: from the name)
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0              # dense FFN width (GELU MLP, as DiT)


@dataclass
class MoEConfig:
    num_experts: Optional[int] = None   # None: from the model name (…-8E2A → 8); 0 with a dense name: dense
    top_k: Optional[int] = None         # None: from the model name (…-8E2A → 2)
    router: str = "token_choice"        # token_choice | expert_choice
    score_function: str = "softmax"     # softmax | sigmoid
    normalize_topk: bool = False        # renormalise the k selected weights to sum to 1
    expert_mlp_ratio: float = 4.0       # routed SwiGLU expert hidden = ratio * width (DiT-MoE: 4)
    shared_mlp_ratio: float = 2.0       # always-on shared SwiGLU hidden = ratio * width (DiT-MoE: 2); 0 = none
    aux_loss_coeff: float = 0.01        # DiT-MoE expert-level balance loss alpha
    z_loss_coeff: float = 0.0
    capacity_factor: float = 1.0        # expert_choice: each expert takes capacity_factor * k * T / E tokens
    bias_update_rate: float = 0.0       # >0: aux-loss-free balancing (selection bias, sigmoid scores)
    expert_impl: str = "auto"           # auto | grouped_mm | loop


@dataclass
class DiffusionConfig:
    objective: str = "flow"             # flow | ddpm
    t_sampling: str = "uniform"         # flow: uniform | logit_normal
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    num_timesteps: int = 1000           # ddpm
    beta_start: float = 1e-4
    beta_end: float = 0.02
    vlb_weight: float = 0.001
    sampler: Optional[str] = None       # None: euler (flow) / ddim (ddpm); also heun
    sample_steps: int = 50
    cfg_scale: float = 1.0
    guidance_low: float = 0.0           # guidance interval in t ∈ [0, 1]
    guidance_high: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"          # constant | cosine
    min_lr_ratio: float = 0.0           # cosine floor as a fraction of lr
    grad_clip: float = 1.0              # 0 disables clipping (the norm is still logged)
    ema_decay: float = 0.9999


@dataclass
class DataConfig:
    path: str = "data/synthetic"        # shards: directory, glob, brace list, pipe:CMD, s3:// or http(s):// pattern
    batch_size: int = 32                # per-process micro-batch
    shuffle_buffer: int = 1000
    hflip: bool = False                 # random horizontal flips (latent shards: the stored latent_flip.npy)
    image_key: str = "auto"             # member holding x; auto: from the manifest (or the first sample)
    num_workers: int = 0                # loader worker processes per rank (0: all in the training process)
    mode: str = "epoch"                 # epoch: each sample once per epoch | resampled: shards drawn with replacement
    steps_per_epoch: int = 0            # batches per epoch per rank (0: manifest samples / (ranks * batch_size))
    sources: List[str] = field(default_factory=list)     # several shard sets to mix (replaces path when set)
    weights: List[float] = field(default_factory=list)   # mixing weight per source (empty: equal)
    manifest: Optional[str] = None      # manifest.json for URL shards (default: the one next to local shards)
    max_corrupt_fraction: float = 0.01  # skip corrupt samples; abort when more than this fraction is corrupt


@dataclass
class TrainConfig:
    steps: int = 1000
    run_dir: str = "runs/default"
    seed: int = 0
    grad_accum: int = 1
    deterministic: bool = False
    device: str = "auto"                # auto | cpu | cuda
    precision: str = "auto"             # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    activation_checkpointing: bool = False
    max_bad_steps: int = 5              # consecutive non-finite losses before aborting
    checkpoint_every: int = 0           # 0: only at the end
    resume: str = "none"                # none | auto | PATH
    checkpoint_format: str = "sharded"  # sharded (DCP: every rank writes its pieces) | consolidated (one .pt file)
    async_save: bool = False            # sharded: block only while staging, write in a background thread
    keep_last: int = 3                  # keep the newest N checkpoints (0: keep all)
    keep_every: int = 0                 # also keep every step divisible by N (0: none)
    max_wall_minutes: float = 0.0       # save and exit 75 (requeue) after this many minutes (0: off)


@dataclass
class LoggingConfig:
    log_every: int = 10
    sample_every: int = 0               # 0: only at the end
    samples_per_class: int = 4
    max_sample_classes: int = 10
    wandb: str = "offline"              # offline | online | disabled
    wandb_project: str = "dit_scale"
    progress_bar: bool = True


@dataclass
class ParallelConfig:
    engine: str = "local"               # local (one process) | fsdp (FSDP2) | deepspeed (ZeRO), any process count
    ep: int = 1                         # expert-parallel size
    zero_stage: int = 2                 # deepspeed: 1 | 2 (with experts) | 3 (dense models only)


@dataclass
class MuPConfig:
    enabled: bool = False               # false: standard parameterisation (every multiplier 1)
    base_width: int = 128               # width at which μP equals SP; width multiplier m = hidden_size / base_width
    output_mult: float = 1.0            # readout output multiplier (μP only)
    attn_scale: str = "sqrt"            # sqrt: 1/sqrt(head_dim) | inverse: 1/head_dim (μP only)
    zero_init_query: bool = False       # zero the query projection at init (μP only)


@dataclass
class MaskConfig:
    ratio: float = 0.0                  # fraction of patch tokens dropped in training, in [0, 1); 0: off
    mixer_depth: int = 0                # dense blocks on all tokens before the drop (deferred masking's patch-mixer)
    masked_loss_weight: float = 0.0     # weight of the denoising loss on the dropped tokens (kept tokens: 1)
    unmask_at_step: Optional[int] = None    # from this step on train unmasked (the short finetune phase); null: never


@dataclass
class AlignConfig:
    teacher: str = "shards"             # shards (batch["feat"]) | online (frozen DINOv2 from align.teacher_path)
    teacher_path: Optional[str] = None  # local directory of a transformers Dinov2Model (online teacher)
    teacher_dim: Optional[int] = None   # teacher feature width (shards: required for REPA; online: from its config)
    projector_dim: int = 2048           # hidden width of the REPA projector / SRA head MLPs
    repa_weight: float = 0.0            # REPA λ; 0: off
    repa_depth: int = 8                 # block (1-based) whose output the projector reads
    haste_weight: float = 0.0           # HASTE attention-distillation weight; 0: off (needs teacher=online)
    haste_layers: List[int] = field(default_factory=list)           # student blocks (1-based)
    haste_teacher_layers: List[int] = field(default_factory=list)   # matching teacher layers (1-based)
    stop_step: Optional[int] = None     # HASTE's termination: from this step on no alignment term, no teacher work
    sra_weight: float = 0.0             # SRA self-alignment weight; 0: off
    sra_student_depth: int = 4          # block of the online model that the SRA head reads
    sra_teacher_depth: int = 8          # block of the EMA model that is the target (its forward stops there)
    sra_t_gap: float = 0.1              # the EMA sees t - gap (flow t in [0, 1]; ddpm: gap × num_timesteps)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    mup: MuPConfig = field(default_factory=MuPConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    align: AlignConfig = field(default_factory=AlignConfig)


CHOICES = {
    "moe.router": ("token_choice", "expert_choice"),
    "moe.score_function": ("softmax", "sigmoid"),
    "moe.expert_impl": ("auto", "grouped_mm", "loop"),
    "diffusion.objective": ("flow", "ddpm"),
    "diffusion.t_sampling": ("uniform", "logit_normal"),
    "optim.schedule": ("constant", "cosine"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "fp32", "bf16"),
    "logging.wandb": ("offline", "online", "disabled"),
    "parallel.engine": ("local", "fsdp", "deepspeed"),
    "parallel.zero_stage": (1, 2, 3),
    "data.image_key": ("auto", "png", "jpg", "jpeg", "npy", "safetensors", "latent.npy", "latent.safetensors",
                       "image.png", "image.jpg"),
    "data.mode": ("epoch", "resampled"),
    "mup.attn_scale": ("sqrt", "inverse"),
    "align.teacher": ("shards", "online"),
}
SAMPLERS = {"flow": ("euler", "heun"), "ddpm": ("ddim",)}


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------

def _read_yaml(path: str, seen: tuple = ()) -> DictConfig:
    """Read a YAML file, recursively merging it over the file its `base:` key names."""
    if not os.path.isfile(path):
        raise ConfigError(f"Config file '{path}' does not exist; pass an existing YAML file to --config.")
    if os.path.abspath(path) in seen:
        raise ConfigError(f"Config file '{path}' is its own base (cycle through 'base:'); remove the cycle.")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"Config file '{path}' is not valid YAML ({e}).") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"Config file '{path}' must hold a mapping of sections (model:, moe:, train:, ...).")
    base = node.pop("base", None)
    if base is None:
        return node
    base_path = os.path.join(os.path.dirname(path), str(base))
    return OmegaConf.merge(_read_yaml(base_path, seen + (os.path.abspath(path),)), node)


def _field_names(section: str) -> List[str]:
    cls = {f.name: f.type for f in dataclasses.fields(Config)}.get(section)
    if cls is None:
        return [f.name for f in dataclasses.fields(Config)]
    return [f.name for f in dataclasses.fields(globals()[cls] if isinstance(cls, str) else cls)]


def _merge(schema: DictConfig, other: Any, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, other)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        section = key.split(".")[0] if "." in key else ""
        allowed = ", ".join(_field_names(section))
        where = f"'{section}'" if section else "the top level"
        raise ConfigError(f"Unknown config key '{key}' in {origin}; allowed keys in {where}: {allowed}.") from None
    except ValidationError as e:
        raise ConfigError(f"Config field '{e.full_key}' in {origin} got {e.value!r}, "
                          f"which is not a valid {_type_name(e.full_key)}.") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"Config field '{getattr(e, 'full_key', '?')}' in {origin} is invalid: {e.msg}.") from None


def _type_name(full_key: str) -> str:
    section, _, name = str(full_key).partition(".")
    for f in dataclasses.fields(Config):
        if f.name == section:
            for g in dataclasses.fields(f.default_factory()):
                if g.name == name:
                    t = str(g.type).replace("Optional[", "").rstrip("]")
                    return {"int": "integer", "float": "number", "bool": "boolean (true/false)",
                            "str": "string"}.get(t, t)
    return "value"


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> DictConfig:
    """Schema ← YAML (with bases) ← `key=value` overrides, then validated. Returns a read-only DictConfig."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        cfg = _merge(cfg, _read_yaml(path), f"'{path}'")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' must look like key=value (e.g. train.steps=100).")
        key, value = item.split("=", 1)
        try:
            dotted = OmegaConf.from_dotlist([f"{key}={value}"])
        except Exception as e:
            raise ConfigError(f"Override '{item}' could not be parsed ({e}).") from None
        cfg = _merge(cfg, dotted, f"override '{item}'")
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, run_dir: str) -> str:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(to_yaml(cfg))
    os.replace(tmp, path)
    return path


def config_from_yaml_text(text: str) -> DictConfig:
    """Rebuild a validated config from the YAML text stored in a run directory or checkpoint."""
    cfg = _merge(OmegaConf.structured(Config), OmegaConf.create(text), "the stored config")
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------------------
# Validation (values; keys and types are checked by the schema merge)
# --------------------------------------------------------------------------------------------------------------

def _fail(msg: str):
    raise ConfigError(msg)


def validate(cfg: DictConfig) -> None:
    from dit_scale.models.registry import parse_model_name  # models import nothing from here

    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            _fail(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}.")

    m, moe, d, o, t = cfg.model, cfg.moe, cfg.diffusion, cfg.optim, cfg.train
    try:
        spec = parse_model_name(m.name)
    except KeyError as e:
        _fail(str(e.args[0]))

    for key in ("model.input_size", "model.in_channels", "model.num_classes", "train.steps",
                "train.grad_accum", "data.batch_size", "diffusion.sample_steps", "logging.log_every",
                "diffusion.num_timesteps", "train.max_bad_steps", "parallel.ep"):
        if OmegaConf.select(cfg, key) < 1:
            _fail(f"{key} must be a positive integer, got {OmegaConf.select(cfg, key)}.")
    for key in ("model.depth", "model.hidden_size", "model.num_heads"):
        v = OmegaConf.select(cfg, key)
        if v is not None and v < 1:
            _fail(f"{key} must be a positive integer or null (use the registry size), got {v}.")
    for key in ("data.shuffle_buffer", "optim.warmup_steps", "train.checkpoint_every", "logging.sample_every",
                "optim.weight_decay", "optim.grad_clip", "moe.aux_loss_coeff", "moe.z_loss_coeff",
                "moe.bias_update_rate", "moe.shared_mlp_ratio"):
        if OmegaConf.select(cfg, key) < 0:
            _fail(f"{key} must be >= 0, got {OmegaConf.select(cfg, key)}.")

    if o.lr <= 0:
        _fail(f"optim.lr must be a positive number, got {o.lr}.")
    if not 0.0 <= o.ema_decay < 1.0:
        _fail(f"optim.ema_decay must be in [0, 1), got {o.ema_decay}.")
    for key in ("optim.beta1", "optim.beta2", "model.class_dropout"):
        if not 0.0 <= OmegaConf.select(cfg, key) < 1.0:
            _fail(f"{key} must be in [0, 1), got {OmegaConf.select(cfg, key)}.")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        _fail(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}.")

    width = m.hidden_size or spec.hidden_size
    heads = m.num_heads or spec.num_heads
    if width % heads:
        _fail(f"model.hidden_size={width} must be divisible by model.num_heads={heads}.")
    if m.input_size % spec.patch_size:
        _fail(f"model.input_size={m.input_size} must be divisible by the patch size {spec.patch_size} "
              f"of model.name={m.name}.")

    # Sparse structure: the name sets the default, explicit values must agree with a sparse name.
    for key, named in (("num_experts", spec.num_experts), ("top_k", spec.top_k)):
        given = moe[key]
        if named and given is not None and given != named:
            _fail(f"moe.{key}={given} contradicts model.name={m.name} ({key}={named}); "
                  f"set moe.{key}=null or use a matching name.")
    num_experts = moe.num_experts if moe.num_experts is not None else spec.num_experts
    top_k = moe.top_k if moe.top_k is not None else (spec.top_k or (1 if num_experts else 0))
    if num_experts < 0:
        _fail(f"moe.num_experts must be >= 0 (0 = dense), got {num_experts}.")
    if num_experts:
        if not 1 <= top_k <= num_experts:
            _fail(f"moe.top_k={top_k} must be between 1 and moe.num_experts={num_experts}.")
        if moe.expert_mlp_ratio <= 0:
            _fail(f"moe.expert_mlp_ratio must be > 0, got {moe.expert_mlp_ratio}.")
        if moe.capacity_factor <= 0:
            _fail(f"moe.capacity_factor must be > 0, got {moe.capacity_factor}.")
        if moe.bias_update_rate > 0 and (moe.score_function != "sigmoid" or moe.router != "token_choice"):
            _fail("moe.bias_update_rate > 0 (aux-loss-free balancing) needs moe.score_function=sigmoid "
                  "and moe.router=token_choice.")
        if num_experts % cfg.parallel.ep:
            _fail(f"moe.num_experts={num_experts} must be divisible by parallel.ep={cfg.parallel.ep}.")
        if cfg.parallel.engine == "deepspeed" and cfg.parallel.zero_stage == 3:
            _fail("parallel.zero_stage=3 shards every parameter over all ranks, which DeepSpeed does not combine "
                  "with expert groups; use parallel.zero_stage=1 or 2 for a sparse model (or parallel.engine=fsdp).")
    elif cfg.parallel.ep != 1:
        _fail(f"parallel.ep={cfg.parallel.ep} needs a sparse model (moe.num_experts > 0).")

    if d.objective == "flow" and m.learn_sigma:
        _fail("model.learn_sigma=true only works with diffusion.objective=ddpm; set it to false for flow.")
    if d.sampler is not None and d.sampler not in SAMPLERS[d.objective]:
        _fail(f"diffusion.sampler={d.sampler!r} does not fit diffusion.objective={d.objective}; "
              f"choose one of: {', '.join(SAMPLERS[d.objective])}.")
    if not 0.0 <= d.guidance_low <= d.guidance_high <= 1.0:
        _fail(f"diffusion.guidance_low/high must satisfy 0 <= low <= high <= 1, got "
              f"{d.guidance_low}, {d.guidance_high}.")
    if d.logit_normal_std <= 0 or d.beta_start <= 0 or not d.beta_start < d.beta_end < 1:
        _fail("diffusion.logit_normal_std must be > 0 and 0 < diffusion.beta_start < diffusion.beta_end < 1.")
    _validate_data(cfg.data)
    _validate_mup(cfg, width, heads)
    _validate_mask_align(cfg, m.depth or spec.depth)
    if not (t.resume in ("none", "auto") or t.resume):
        _fail("train.resume must be none, auto or a checkpoint path.")
    if t.checkpoint_format not in ("sharded", "consolidated"):
        _fail(f"train.checkpoint_format must be sharded or consolidated, got {t.checkpoint_format!r}.")
    if t.async_save and t.checkpoint_format != "sharded":
        _fail("train.async_save=true needs train.checkpoint_format=sharded.")
    for key in ("keep_last", "keep_every", "max_wall_minutes"):
        if t[key] < 0:
            _fail(f"train.{key} must be >= 0 (0 = off), got {t[key]}.")


def _validate_data(data) -> None:
    for key in ("num_workers", "steps_per_epoch"):
        if data[key] < 0:
            _fail(f"data.{key} must be >= 0, got {data[key]}.")
    if not 0.0 <= data.max_corrupt_fraction <= 1.0:
        _fail(f"data.max_corrupt_fraction must be in [0, 1], got {data.max_corrupt_fraction}.")
    if data.weights and len(data.weights) != len(data.sources):
        _fail(f"data.weights has {len(data.weights)} entries for {len(data.sources)} data.sources; "
              f"give one weight per source or none.")
    if any(w <= 0 for w in data.weights):
        _fail(f"data.weights must all be > 0, got {list(data.weights)}.")


def _validate_mup(cfg, width: int, heads: int) -> None:
    mp = cfg.mup
    if not mp.enabled:
        for key, default in (("output_mult", 1.0), ("attn_scale", "sqrt"), ("zero_init_query", False)):
            if mp[key] != default:
                _fail(f"mup.{key}={mp[key]} only applies with mup.enabled=true; set mup.enabled=true or remove it.")
        return
    head_dim = width // heads
    if mp.base_width < 1 or mp.base_width % head_dim:
        _fail(f"mup.base_width={mp.base_width} must be a positive multiple of the head dim {head_dim} "
              f"(model.hidden_size / model.num_heads), since heads scale with width.")
    if mp.output_mult <= 0:
        _fail(f"mup.output_mult must be > 0, got {mp.output_mult}.")


def _validate_mask_align(cfg, depth: int) -> None:
    mk, a = cfg.mask, cfg.align
    if not 0.0 <= mk.ratio < 1.0:
        _fail(f"mask.ratio must be in [0, 1) (the fraction of tokens dropped), got {mk.ratio}.")
    for key in ("mask.mixer_depth", "mask.masked_loss_weight", "align.repa_weight", "align.haste_weight",
                "align.sra_weight"):
        if OmegaConf.select(cfg, key) < 0:
            _fail(f"{key} must be >= 0, got {OmegaConf.select(cfg, key)}.")
    for key in ("mask.unmask_at_step", "align.stop_step"):
        v = OmegaConf.select(cfg, key)
        if v is not None and v < 0:
            _fail(f"{key} must be >= 0 or null (never), got {v}.")
    if mk.masked_loss_weight > 0 and mk.ratio == 0:
        _fail("mask.masked_loss_weight only applies with mask.ratio > 0; set mask.ratio or remove it.")
    if mk.ratio > 0 and cfg.model.learn_sigma:
        _fail("mask.ratio > 0 takes the denoising loss per token, which model.learn_sigma=true (the VLB term) does "
              "not support; set model.learn_sigma=false.")

    def check_block(key):
        v = OmegaConf.select(cfg, key)
        if not 1 <= v <= depth:
            _fail(f"{key}={v} is beyond the model's depth {depth} (model.depth / model.name); choose a block "
                  f"between 1 and {depth}.")

    if a.projector_dim < 1:
        _fail(f"align.projector_dim must be a positive integer, got {a.projector_dim}.")
    if a.repa_weight > 0:
        check_block("align.repa_depth")
    if a.sra_weight > 0:
        check_block("align.sra_student_depth")
        check_block("align.sra_teacher_depth")
        if not 0.0 <= a.sra_t_gap < 1.0:
            _fail(f"align.sra_t_gap must be in [0, 1) (a fraction of the time range), got {a.sra_t_gap}.")
    if a.teacher_dim is not None and a.teacher_dim < 1:
        _fail(f"align.teacher_dim must be a positive integer or null, got {a.teacher_dim}.")
    if a.haste_weight > 0:
        if a.teacher != "online":
            _fail("align.haste_weight > 0 needs align.teacher=online (attention maps come from the online teacher).")
        if not a.haste_layers or len(a.haste_layers) != len(a.haste_teacher_layers):
            _fail(f"align.haste_layers {list(a.haste_layers)} and align.haste_teacher_layers "
                  f"{list(a.haste_teacher_layers)} must be non-empty lists of the same length (student, teacher).")
        for v in a.haste_layers:
            if not 1 <= v <= depth:
                _fail(f"align.haste_layers has block {v}, beyond the model's depth {depth}; use blocks 1..{depth}.")
    needs_teacher = a.haste_weight > 0 or (a.repa_weight > 0 and a.teacher == "online")
    if needs_teacher:
        if not a.teacher_path:
            _fail("align.teacher=online needs align.teacher_path, a local directory with a DINOv2 "
                  "(transformers Dinov2Model) config.json and weights.")
        if cfg.model.in_channels != 3:
            _fail(f"align.teacher=online needs pixel-space data (model.in_channels=3, got {cfg.model.in_channels}); "
                  f"for latents precompute the features into the shards and use align.teacher=shards.")
        from dit_scale.align.teacher import read_teacher_config
        try:
            tc = read_teacher_config(a.teacher_path)
        except (OSError, ValueError) as e:
            _fail(f"align.teacher_path={a.teacher_path!r} is not a readable DINOv2 directory ({e}).")
        if a.teacher_dim is not None and a.teacher_dim != tc["hidden_size"]:
            _fail(f"align.teacher_dim={a.teacher_dim} does not match the teacher's hidden_size {tc['hidden_size']} "
                  f"in {a.teacher_path}; set align.teacher_dim=null.")
        for v in a.haste_teacher_layers if a.haste_weight > 0 else ():
            if not 1 <= v <= tc["num_hidden_layers"]:
                _fail(f"align.haste_teacher_layers has layer {v}, beyond the teacher's "
                      f"{tc['num_hidden_layers']} layers; use layers 1..{tc['num_hidden_layers']}.")
    elif a.repa_weight > 0 and a.teacher_dim is None:
        _fail("align.repa_weight > 0 with align.teacher=shards needs align.teacher_dim (the width of the "
              "features stored in the shards, e.g. 768 for DINOv2-B).")


def resolved_moe(cfg: DictConfig) -> tuple:
    """(num_experts, top_k) after applying the model name's defaults; (0, 0) for a dense model."""
    from dit_scale.models.registry import parse_model_name
    spec = parse_model_name(cfg.model.name)
    e = cfg.moe.num_experts if cfg.moe.num_experts is not None else spec.num_experts
    k = cfg.moe.top_k if cfg.moe.top_k is not None else (spec.top_k or (1 if e else 0))
    return (e, k) if e else (0, 0)
