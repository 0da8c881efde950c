"""The run configuration's schema: typed OmegaConf structured dataclasses, one per section.

Fields marked "derived" are filled in once when the config is loaded (`dit_scale.config.resolve`): a value given
for them must agree with what they derive from. Everything else is the user's to set (YAML or `key=value`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class ModelConfig:
    name: str = "DiT-S/2-8E2A"          # registry name: DiT-{XS,S,B,L,XL,G}/{2,4,8}[-{E}E{k}A]
    input_size: int = 32                # spatial size of the model input (latent or pixels)
    in_channels: int = 4                # channels of the model input (latents: 4; pixels: 3)
    num_classes: int = 1000             # class labels (0: unconditional)
    class_dropout: float = 0.1          # label dropout for classifier-free guidance
    learn_sigma: bool = False           # DDPM only: predict the variance too (DiT's hybrid loss)
    qk_norm: bool = False               # RMS-normalise queries and keys per head
    attention: str = "auto"             # attention kernel: auto (PyTorch picks) | flash | efficient | cudnn | math
    depth: Optional[int] = None         # overrides of the registry size (None: from the name)
    hidden_size: Optional[int] = None   # width (None: from the name)
    num_heads: Optional[int] = None     # attention heads (None: from the name)
    mlp_ratio: float = 4.0              # dense FFN width (GELU MLP, as DiT)
    patch_overlap: int = 0              # each token's embedding also reads this many pixels of its neighbouring
                                        # patches on every side (docs/models.md); 0: DiT's patch embedding
    patch_size: Optional[int] = None    # derived from the name when the config is loaded
    num_tokens: Optional[int] = None    # derived: (input_size / patch_size)²
    conditioning: str = "class"         # class (labels) | text (captions, cross-attention: docs/text-to-image.md)
    caption_dropout: float = 0.1        # text: captions replaced by the learned null caption (classifier-free guidance)
    text_dim: Optional[int] = None      # text: caption feature width (derived from model.text_encoder's config.json)
    text_len: Optional[int] = None      # text: caption tokens per sample (the shards' text_encoder.max_length)
    text_encoder: Optional[str] = None  # text: local T5 / CLIP text folder for prompts (default: the shards' manifest's)


@dataclass
class MoEConfig:
    num_experts: Optional[int] = None   # None: from the model name (…-8E2A → 8); 0 with a dense name: dense
    top_k: Optional[int] = None         # None: from the model name (…-8E2A → 2); a value overrides the name's
    router: str = "token_choice"        # token_choice | expert_choice
    score_function: str = "softmax"     # softmax | sigmoid
    normalize_topk: bool = False        # renormalise the k selected weights to sum to 1
    expert_mlp_ratio: float = 4.0       # routed SwiGLU expert hidden = ratio * width (DiT-MoE: 4)
    shared_mlp_ratio: float = 2.0       # always-on shared SwiGLU hidden = ratio * width (DiT-MoE: 2); 0 = none
    aux_loss_coeff: float = 0.01        # DiT-MoE expert-level balance loss alpha
    z_loss_coeff: float = 0.0           # router z-loss coefficient (0: off)
    capacity_factor: float = 1.0        # expert_choice: an expert takes capacity_factor*k*T/E of an image's T tokens
    bias_update_rate: float = 0.0       # >0: aux-loss-free balancing (selection bias, sigmoid scores)
    expert_impl: str = "auto"           # auto | grouped_mm | loop
    expert_act: str = "swiglu"          # expert FFN: swiglu (DiT-MoE) | gelu (DiT's dense FFN, biases: upcycled DiTs)
    expert_hidden: Optional[int] = None  # derived: expert_mlp_ratio × width, rounded up to a multiple of 8
    shared_hidden: Optional[int] = None  # derived: shared_mlp_ratio × width, rounded up to a multiple of 8


@dataclass
class DiffusionConfig:
    objective: str = "flow"             # flow | ddpm
    t_sampling: str = "uniform"         # flow: uniform | logit_normal
    logit_normal_mean: float = 0.0      # logit_normal t sampling: mean of the normal
    logit_normal_std: float = 1.0       # logit_normal t sampling: standard deviation
    time_scale: float = 1000.0          # flow: the model sees t × time_scale (DiT's 0..1000; DiT-MoE's flow models: 1)
    num_timesteps: int = 1000           # ddpm
    beta_start: float = 1e-4            # ddpm: first beta of the linear schedule
    beta_end: float = 0.02              # ddpm: last beta of the linear schedule
    vlb_weight: float = 0.001           # ddpm with learn_sigma: weight of the variational bound term
    sampler: Optional[str] = None       # None: euler (flow) / ddim (ddpm); also heun, sde (flow), ancestral (ddpm)
    sde_strength: float = 1.0           # sampler sde: noise each step removes and adds back (0: the Euler ODE)
    sample_steps: int = 50              # sampler steps for sample grids
    cfg_scale: float = 1.0              # classifier-free guidance scale for sample grids (1: none)
    guidance_low: float = 0.0           # guidance interval in t ∈ [0, 1]
    guidance_high: float = 1.0          # upper end of the guidance interval
    grid_shift: int = 0                 # sampling: move the patch grid by this many pixels (half the patch side)
                                        # between model evaluations, hiding block edges (0: DiT's sampling)


@dataclass
class OptimConfig:
    lr: float = 1e-4                    # AdamW learning rate (peak, after warm-up)
    weight_decay: float = 0.0           # AdamW decoupled weight decay (roles decide which parameters)
    beta1: float = 0.9                  # AdamW beta1
    beta2: float = 0.999                # AdamW beta2
    eps: float = 1e-8                   # AdamW epsilon
    warmup_steps: int = 0               # linear learning-rate warm-up, optimizer steps
    schedule: str = "constant"          # constant | cosine
    min_lr_ratio: float = 0.0           # cosine floor as a fraction of lr
    grad_clip: float = 1.0              # 0 disables clipping (the norm is still logged)
    ema_decay: float = 0.9999           # EMA decay per optimizer step (with warm-up)


@dataclass
class DataConfig:
    path: str = "data/synthetic"        # shards: directory, glob, brace list, pipe:CMD, s3:// or http(s):// pattern
    batch_size: int = 32                # per-process micro-batch
    shuffle_buffer: int = 2048          # samples held for shuffling, over all partitions (0: shard order)
    hflip: bool = False                 # random horizontal flips (latent shards: the stored latent_flip.npy)
    image_key: str = "auto"             # member holding x; auto: from the manifest (or the first sample)
    num_workers: int = 0                # loader worker processes per rank (0: all in the training process)
    partitions: int = 64                # streams of the global sample order; a multiple of the data-parallel size
    mode: str = "epoch"                 # epoch: each sample once per epoch | resampled: shards drawn with replacement
    steps_per_epoch: int = 0            # resampled: an epoch of this many global batches (0: the manifest's samples)
    sources: List[str] = field(default_factory=list)     # several shard sets to mix (replaces path when set)
    weights: List[float] = field(default_factory=list)   # mixing weight per source (empty: equal)
    manifest: Optional[str] = None      # manifest.json for URL shards (default: the one next to local shards)
    max_corrupt_fraction: float = 0.01  # skip corrupt samples; abort when more than this fraction is corrupt
    max_consecutive_corrupt: int = 1000  # abort when this many samples in a row are unusable (wrong key, dead rank)


@dataclass
class TrainConfig:
    steps: int = 1000                   # optimizer steps of the run
    run_dir: str = "runs/default"       # where checkpoints, metrics, samples and the config go
    seed: int = 0                       # seed of the init, the data order and the training randomness
    grad_accum: int = 1                 # micro-batches per optimizer step
    deterministic: bool = False         # deterministic algorithms (slower; for exact reproduction)
    device: str = "auto"                # auto | cpu | cuda
    precision: str = "auto"             # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool = False               # torch.compile each block
    compile_mode: str = "default"       # with compile: default | reduce-overhead (CUDA graphs) | max-autotune |
                                        # max-autotune-no-cudagraphs (torch.compile modes)
    activation_checkpointing: bool = False # recompute each block in the backward (less memory)
    max_bad_steps: int = 5              # consecutive non-finite losses before aborting
    checkpoint_every: int = 0           # 0: only at the end
    resume: str = "none"                # none | auto | PATH
    init_from: Optional[str] = None     # weights only (step 0, fresh optimizer): a checkpoint, export or converted /
                                        # upcycled file; a resume of this run's own checkpoints wins over it
    checkpoint_format: str = "sharded"  # sharded (DCP: every rank writes its pieces) | consolidated (one .pt file)
    async_save: bool = False            # sharded: block only while staging, write in a background thread
    keep_last: int = 3                  # keep the newest N checkpoints (0: keep all)
    keep_every: int = 0                 # also keep every step divisible by N (0: none)
    max_wall_minutes: float = 0.0       # save and exit 75 (requeue) after this many minutes (0: off)


@dataclass
class LoggingConfig:
    log_every: int = 10                 # steps per metrics row (and per host sync of the statistics)
    sample_every: int = 0               # 0: only at the end
    samples_per_class: int = 4          # columns of the sample grid
    max_sample_classes: int = 10        # rows of the sample grid (the first classes)
    wandb: str = "offline"              # offline | online | disabled
    wandb_project: str = "dit_scale"    # wandb project name
    progress_bar: bool = True           # a tqdm bar on a terminal (a log file gets one line per row)


@dataclass
class ParallelConfig:
    engine: str = "local"               # local (one process) | fsdp (FSDP2) | deepspeed (ZeRO), any process count
    ep: int = 1                         # expert-parallel size (over the data-parallel ranks)
    tp: int = 1                         # tensor-parallel size: attention heads and FFN widths split (Megatron)
    sp: bool = True                     # with tp > 1, sequence parallelism: 1/tp of the tokens between the splits
    cp: int = 1                         # context-parallel size: 1/cp of the tokens, all-to-all attention (Ulysses)
    zero_stage: int = 2                 # deepspeed: 1 | 2 (with experts) | 3 (dense models only)
    timeout_minutes: float = 30.0       # collective timeout of the process group: longer than the slowest save


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
    scale_batch: bool = False           # token budget: a masked micro-batch holds data.batch_size × tokens / kept
                                        # images (as many backbone tokens as an unmasked one); needs tokens / kept whole


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
class EvalConfig:
    every: int = 0                      # periodic evaluation every N training steps (0: off); also at the last step
    val_path: Optional[str] = None      # held-out shards for the validation loss (None: no validation loss)
    val_samples: int = 256              # the first N held-out samples
    val_t_bins: int = 4                 # each sample at every bin centre t = (k + 0.5) / bins, fixed noise
    val_batch_size: int = 32            # images per validation-loss batch and rank
    fid_samples: int = 0                # images for the periodic FID (0: none); evaluate.py: --num-samples
    inception: Optional[str] = None     # local FID Inception weights (.pth / .safetensors), needed for FID
    ref: Optional[str] = None           # reference statistics: an .npz (ADM batch or cache) or shards:PATH
    ref_samples: int = 50000            # shards:PATH references use the first N samples
    captions: Optional[str] = None      # text models: held-out shards whose captions condition the FID samples
                                        # (sample i: caption i mod M); None: eval.ref's shards:PATH, else eval.val_path
    sampler: Optional[str] = None       # sampling for evaluation; None: diffusion.sampler (ddpm: also ancestral)
    steps: Optional[int] = None         # None: diffusion.sample_steps
    cfg_scale: Optional[float] = None   # None: diffusion.cfg_scale
    guide_channels: Optional[int] = None  # guide only the first N channels (DiT: 3); None: all
    batch_size: int = 32                # images per sampling batch and rank
    seed: int = 0                       # noise seeds of evaluation samples and of the validation loss
    ema: bool = True                    # evaluate the EMA weights (false: the trained weights)


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
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "model.conditioning": ("class", "text"),
    "moe.router": ("token_choice", "expert_choice"),
    "moe.score_function": ("softmax", "sigmoid"),
    "moe.expert_impl": ("auto", "grouped_mm", "loop"),
    "model.attention": ("auto", "flash", "efficient", "cudnn", "math"),
    "moe.expert_act": ("swiglu", "gelu"),
    "diffusion.objective": ("flow", "ddpm"),
    "diffusion.t_sampling": ("uniform", "logit_normal"),
    "optim.schedule": ("constant", "cosine"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "logging.wandb": ("offline", "online", "disabled"),
    "parallel.engine": ("local", "fsdp", "deepspeed"),
    "parallel.zero_stage": (1, 2, 3),
    "data.image_key": ("auto", "png", "jpg", "jpeg", "npy", "safetensors", "latent.npy", "latent.safetensors",
                       "image.png", "image.jpg"),
    "data.mode": ("epoch", "resampled"),
    "mup.attn_scale": ("sqrt", "inverse"),
    "align.teacher": ("shards", "online"),
}
