"""Value checks of a run configuration (keys and types are checked by the schema merge in `loading.py`).

`check_values` runs before the derived values are resolved (choices, signs and ranges of what the user gave),
`validate` after (everything that needs the resolved width, depth, experts or token count). Each failure is a
`ConfigError` with one sentence naming the field and what is allowed.
"""
from __future__ import annotations


import math

from omegaconf import DictConfig, ListConfig, OmegaConf

from dit_scale.config.external import read_teacher_config
from dit_scale.config.schema import CHOICES
from dit_scale.diffusion.sampler_names import DEFAULT_SAMPLER, SAMPLERS, step_count_error
from dit_scale.errors import ConfigError
from dit_scale.models.args import num_kept


def _fail(msg: str):
    raise ConfigError(msg)


def check_grid_shift(shift: int, patch_size: int, field: str = "diffusion.grid_shift") -> None:
    """ConfigError naming `field` unless 0 <= shift < patch_size (the config's check, and the CLIs' --grid-shift)."""
    if not 0 <= shift < patch_size:
        _fail(f"{field} must be between 0 and the patch size minus one ({patch_size - 1}), got {shift}; half the "
              f"patch side ({patch_size // 2}) is the usual choice, 0 turns it off.")


def check_sampling_flags(sde_strength=None, guidance_interval=None) -> None:
    """ConfigError naming the flag unless the CLIs' --sde-strength (diffusion.sde_strength) and --guidance-interval
    LOW HIGH (diffusion.guidance_low/high) are in range; None: the run's own value."""
    if sde_strength is not None and not sde_strength >= 0.0:
        _fail(f"--sde-strength must be at least 0 (0: the sde sampler is the Euler ODE), got {sde_strength}.")
    if guidance_interval is not None and not 0.0 <= guidance_interval[0] <= guidance_interval[1] <= 1.0:
        _fail(f"--guidance-interval LOW HIGH must satisfy 0 <= LOW <= HIGH <= 1, got "
              f"{guidance_interval[0]:g} {guidance_interval[1]:g}.")


POSITIVE_INTS = ("model.input_size", "model.in_channels", "train.steps", "train.grad_accum", "data.batch_size",
                 "data.partitions", "diffusion.sample_steps", "logging.log_every", "diffusion.num_timesteps",
                 "train.max_bad_steps", "parallel.ep", "logging.samples_per_class", "logging.max_sample_classes")
OPTIONAL_POSITIVE_INTS = ("model.depth", "model.hidden_size", "model.num_heads")
NON_NEGATIVE = ("data.shuffle_buffer", "optim.warmup_steps", "train.checkpoint_every", "logging.sample_every",
                "optim.weight_decay", "optim.grad_clip", "moe.aux_loss_coeff", "moe.z_loss_coeff",
                "moe.bias_update_rate", "moe.shared_mlp_ratio", "model.num_classes", "train.seed", "optim.eps")


def _check_finite(node, prefix: str = "") -> None:
    """Every number in the config is finite (`optim.lr=inf`, `optim.weight_decay=nan` are mistakes, not settings)."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, DictConfig):
            _check_finite(value, path + ".")
        elif isinstance(value, ListConfig):                 # data.weights=[nan, 1], say
            bad = next((v for v in value if isinstance(v, float) and not math.isfinite(v)), None)
            if bad is not None:
                _fail(f"{path} must hold finite numbers, got {bad} in {list(value)}.")
        elif isinstance(value, float) and not math.isfinite(value):
            _fail(f"{path} must be a finite number, got {value}.")


def check_values(cfg: DictConfig) -> None:
    """Choices, signs and ranges of the values as given (before the derived values are resolved)."""
    _check_finite(cfg)
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            _fail(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}.")
    for key in POSITIVE_INTS:
        if OmegaConf.select(cfg, key) < 1:
            _fail(f"{key} must be a positive integer, got {OmegaConf.select(cfg, key)}.")
    for key in OPTIONAL_POSITIVE_INTS:
        v = OmegaConf.select(cfg, key)
        if v is not None and v < 1:
            _fail(f"{key} must be a positive integer or null (use the registry size), got {v}.")
    for key in NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            _fail(f"{key} must be >= 0, got {OmegaConf.select(cfg, key)}.")
    o = cfg.optim
    if o.lr <= 0:
        _fail(f"optim.lr must be a positive number, got {o.lr}.")
    if not 0.0 <= o.ema_decay < 1.0:
        _fail(f"optim.ema_decay must be in [0, 1), got {o.ema_decay}.")
    for key in ("optim.beta1", "optim.beta2", "model.class_dropout", "model.caption_dropout"):
        if not 0.0 <= OmegaConf.select(cfg, key) < 1.0:
            _fail(f"{key} must be in [0, 1), got {OmegaConf.select(cfg, key)}.")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        _fail(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}.")
    if cfg.model.mlp_ratio <= 0:
        _fail(f"model.mlp_ratio must be > 0 (the dense FFN's width / model.hidden_size), got {cfg.model.mlp_ratio}.")


def validate(cfg: DictConfig) -> None:
    """Checks that need the resolved config (width, depth, experts, tokens)."""
    m, moe, d, t = cfg.model, cfg.moe, cfg.diffusion, cfg.train
    if not 0 <= m.patch_overlap <= m.patch_size:
        _fail(f"model.patch_overlap must be between 0 and the patch size {m.patch_size} (pixels of the "
              f"neighbouring patches a token reads on each side), got {m.patch_overlap}.")
    if moe.num_experts:
        if moe.capacity_factor <= 0:
            _fail(f"moe.capacity_factor must be > 0, got {moe.capacity_factor}.")
        if moe.bias_update_rate > 0 and (moe.score_function != "sigmoid" or moe.router != "token_choice"):
            _fail("moe.bias_update_rate > 0 (aux-loss-free balancing) needs moe.score_function=sigmoid "
                  "and moe.router=token_choice.")
        if moe.num_experts % cfg.parallel.ep:
            _fail(f"moe.num_experts={moe.num_experts} must be divisible by parallel.ep={cfg.parallel.ep}.")
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
    if d.objective == "ddpm" and d.num_timesteps < 2:
        _fail(f"diffusion.num_timesteps={d.num_timesteps} must be at least 2 (DiT: 1000).")
    if d.objective == "ddpm":
        error = step_count_error(d.sampler or DEFAULT_SAMPLER["ddpm"], d.sample_steps, d.num_timesteps)
        if error:
            _fail(f"diffusion.sample_steps={d.sample_steps}: {error}; set diffusion.sample_steps between 2 and "
                  f"{d.num_timesteps}.")
    if not d.sde_strength >= 0.0:
        _fail(f"diffusion.sde_strength must be at least 0 (0: the sde sampler is the Euler ODE), got "
              f"{d.sde_strength}.")
    if not 0.0 <= d.guidance_low <= d.guidance_high <= 1.0:
        _fail(f"diffusion.guidance_low/high must satisfy 0 <= low <= high <= 1, got "
              f"{d.guidance_low}, {d.guidance_high}.")
    check_grid_shift(d.grid_shift, m.patch_size)
    if d.cfg_scale != 1.0 and m.conditioning == "class" and m.num_classes == 0:
        _fail(f"diffusion.cfg_scale={d.cfg_scale} guides towards a class, but model.num_classes=0 (unconditional); "
              f"set diffusion.cfg_scale=1.")
    if d.cfg_scale != 1.0 and m.conditioning == "class" and m.class_dropout == 0:
        _fail(f"diffusion.cfg_scale={d.cfg_scale} needs the null class, which the model learns only from dropped "
              f"labels: set model.class_dropout > 0 (DiT: 0.1), or diffusion.cfg_scale=1.")
    if d.logit_normal_std <= 0 or d.beta_start <= 0 or not d.beta_start < d.beta_end < 1:
        _fail("diffusion.logit_normal_std must be > 0 and 0 < diffusion.beta_start < diffusion.beta_end < 1.")
    _validate_text(cfg)
    _validate_data(cfg.data)
    _validate_mup(cfg)
    _validate_mask_align(cfg)
    if not (t.resume in ("none", "auto") or t.resume):
        _fail("train.resume must be none, auto or a checkpoint path.")
    if t.checkpoint_format not in ("sharded", "consolidated"):
        _fail(f"train.checkpoint_format must be sharded or consolidated, got {t.checkpoint_format!r}.")
    if t.async_save and t.checkpoint_format != "sharded":
        _fail("train.async_save=true needs train.checkpoint_format=sharded.")
    if cfg.parallel.timeout_minutes < 1:
        _fail(f"parallel.timeout_minutes must be >= 1 (a collective must outlast the slowest checkpoint save), got "
              f"{cfg.parallel.timeout_minutes}.")
    for key in ("keep_last", "keep_every", "max_wall_minutes"):
        if t[key] < 0:
            _fail(f"train.{key} must be >= 0 (0 = off), got {t[key]}.")
    _validate_eval(cfg)
    _validate_start_weights(cfg)
    _validate_model_parallel(cfg)


def _validate_text(cfg) -> None:
    """model.conditioning=text: the caption width and length, and guidance's null caption."""
    m, d = cfg.model, cfg.diffusion
    if m.conditioning != "text":
        return
    if m.text_dim is None or m.text_dim < 1:
        where = (f" (model.text_encoder={m.text_encoder!r} has no readable config.json to read it from)"
                 if m.text_encoder else "")
        _fail(f"model.conditioning=text needs model.text_dim, the width of the caption features (the text encoder's "
              f"d_model / hidden_size, e.g. 4096 for T5-XXL; text_encoder.width in the shards' manifest){where}.")
    if m.text_len is None or m.text_len < 1:
        _fail("model.conditioning=text needs model.text_len, the caption tokens per sample (the max length the "
              "shards were encoded with: text_encoder.max_length in their manifest, e.g. 120).")
    if d.cfg_scale != 1.0 and m.caption_dropout == 0:
        _fail(f"diffusion.cfg_scale={d.cfg_scale} needs the null caption, which the model learns only from dropped "
              f"captions: set model.caption_dropout > 0 (PixArt-α: 0.1), or diffusion.cfg_scale=1.")


MAX_PARTITIONS = 4096   # streams of the global sample order: enough for 4096 data-parallel ranks
MAX_BATCH = 2 ** 16      # images per rank and micro-batch: far above what fits a device, far below a start-up that hangs


def _validate_data(data) -> None:
    if data.batch_size > MAX_BATCH:
        _fail(f"data.batch_size={data.batch_size} images per rank and micro-batch cannot work (at most {MAX_BATCH}); "
              f"use a smaller data.batch_size, and train.grad_accum or more processes for a larger global batch.")
    if data.partitions > MAX_PARTITIONS:
        _fail(f"data.partitions={data.partitions} streams would each hold open shards and a shuffle buffer (at most "
              f"{MAX_PARTITIONS}); use a multiple of the data-parallel size up to {MAX_PARTITIONS}.")
    for key in ("num_workers", "steps_per_epoch"):
        if data[key] < 0:
            _fail(f"data.{key} must be >= 0, got {data[key]}.")
    if data.max_consecutive_corrupt < 1:
        _fail(f"data.max_consecutive_corrupt must be a positive integer, got {data.max_consecutive_corrupt}.")
    if not 0.0 <= data.max_corrupt_fraction <= 1.0:
        _fail(f"data.max_corrupt_fraction must be in [0, 1], got {data.max_corrupt_fraction}.")
    if data.weights and len(data.weights) != len(data.sources):
        _fail(f"data.weights has {len(data.weights)} entries for {len(data.sources)} data.sources; "
              f"give one weight per source or none.")
    if any(w <= 0 for w in data.weights):
        _fail(f"data.weights must all be > 0, got {list(data.weights)}.")


def _validate_mup(cfg) -> None:
    mp = cfg.mup
    if not mp.enabled:
        for key, default in (("output_mult", 1.0), ("attn_scale", "sqrt"), ("zero_init_query", False)):
            if mp[key] != default:
                _fail(f"mup.{key}={mp[key]} only applies with mup.enabled=true; set mup.enabled=true or remove it.")
        return
    head_dim = cfg.model.hidden_size // cfg.model.num_heads
    if mp.base_width < 1 or mp.base_width % head_dim:
        _fail(f"mup.base_width={mp.base_width} must be a positive multiple of the head dim {head_dim} "
              f"(model.hidden_size / model.num_heads), since heads scale with width.")
    if mp.output_mult <= 0:
        _fail(f"mup.output_mult must be > 0, got {mp.output_mult}.")


def _validate_mask_align(cfg) -> None:
    mk, a, depth = cfg.mask, cfg.align, cfg.model.depth
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
    if mk.scale_batch:
        _validate_token_budget(cfg)
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


def _validate_eval(cfg) -> None:
    """eval.*: periodic validation loss / FID and the sampling settings of evaluation (files are checked when used:
    a stored config must stay loadable on a machine without them)."""
    e, d = cfg.eval, cfg.diffusion
    for key in ("every", "fid_samples"):
        if e[key] < 0:
            _fail(f"eval.{key} must be >= 0 (0 = off), got {e[key]}.")
    for key in ("val_samples", "val_t_bins", "val_batch_size", "batch_size", "ref_samples"):
        if e[key] < 1:
            _fail(f"eval.{key} must be a positive integer, got {e[key]}.")
    if e.seed < 0:
        _fail(f"eval.seed must be >= 0, got {e.seed}.")
    if e.every and not e.val_path and not e.fid_samples:
        _fail(f"eval.every={e.every} has nothing to evaluate; set eval.val_path (held-out shards) and/or "
              f"eval.fid_samples with eval.inception and eval.ref, or eval.every=0.")
    if e.fid_samples:
        if e.fid_samples < 4:
            _fail(f"eval.fid_samples={e.fid_samples} is too few for FID and precision/recall; use at least 4 "
                  f"(FID-50k: 50000), or 0 for none.")
        for key in ("inception", "ref"):
            if not e[key]:
                _fail(f"eval.fid_samples={e.fid_samples} needs eval.{key} (" + (
                    "the local FID Inception weights file" if key == "inception" else
                    "an .npz of reference statistics or shards:PATH") + ").")
    if e.sampler is not None and e.sampler not in SAMPLERS[d.objective]:
        _fail(f"eval.sampler={e.sampler!r} does not fit diffusion.objective={d.objective}; "
              f"choose one of: {', '.join(SAMPLERS[d.objective])}.")
    if e.steps is not None and e.steps < 1:
        _fail(f"eval.steps must be a positive integer or null (diffusion.sample_steps), got {e.steps}.")
    if d.objective == "ddpm" and e.steps is not None:
        error = step_count_error(e.sampler or d.sampler or DEFAULT_SAMPLER["ddpm"], e.steps, d.num_timesteps)
        if error:
            _fail(f"eval.steps={e.steps}: {error}; set eval.steps between 2 and {d.num_timesteps}.")
    if e.guide_channels is not None and not 1 <= e.guide_channels <= cfg.model.in_channels:
        _fail(f"eval.guide_channels={e.guide_channels} must be between 1 and model.in_channels="
              f"{cfg.model.in_channels}, or null (all).")
    scale = d.cfg_scale if e.cfg_scale is None else e.cfg_scale
    if scale != 1.0 and cfg.model.conditioning == "text" and cfg.model.caption_dropout == 0:
        _fail(f"eval.cfg_scale={scale} needs a text model trained with caption dropout (model.caption_dropout > 0); "
              f"set eval.cfg_scale=1.")
    if scale != 1.0 and cfg.model.conditioning == "class" and (cfg.model.num_classes == 0
                                                               or cfg.model.class_dropout == 0):
        _fail(f"eval.cfg_scale={scale} needs a class-conditional model trained with label dropout "
              f"(model.num_classes > 0, model.class_dropout > 0); set eval.cfg_scale=1.")


def _validate_start_weights(cfg) -> None:
    """diffusion.time_scale, and train.init_from against train.resume: a resume of a checkpoint PATH restores that
    run (weights, optimizer, step), so naming starting weights as well is a contradiction; train.resume=auto with
    train.init_from is the fine-tune that continues its own checkpoints once it has some (whether the file exists is
    checked when it is read, so a stored config stays loadable elsewhere)."""
    d, t = cfg.diffusion, cfg.train
    if not d.time_scale > 0:
        _fail(f"diffusion.time_scale must be > 0 (the flow model sees t × time_scale; DiT: 1000, DiT-MoE's flow "
              f"checkpoints: 1), got {d.time_scale}.")
    if t.init_from is not None and not str(t.init_from).strip():
        _fail("train.init_from must be a checkpoint, export or converted file, or null (start from the init).")
    if t.init_from and t.resume not in ("none", "auto"):
        _fail(f"train.init_from={t.init_from!r} and train.resume={t.resume!r} both name the starting weights; use "
              f"train.resume=auto with train.init_from (a requeued fine-tune continues its own checkpoints), or drop "
              f"train.init_from to continue that checkpoint's run.")


def _validate_token_budget(cfg) -> None:
    """mask.scale_batch: a masked micro-batch holds data.batch_size × tokens / kept images, a whole number."""
    mk, n = cfg.mask, cfg.model.num_tokens
    if mk.ratio == 0:
        _fail("mask.scale_batch=true sizes masked micro-batches by their kept tokens, but mask.ratio=0 masks nothing; "
              "set mask.ratio (e.g. 0.75) or remove mask.scale_batch.")
    kept = num_kept(n, mk.ratio)
    if n % kept:
        _fail(f"mask.scale_batch=true needs whole images per micro-batch, but mask.ratio={mk.ratio} keeps {kept} of "
              f"{n} tokens ({n / kept:.3g} × data.batch_size images); use a ratio that keeps a divisor of {n} "
              f"tokens, {_ratio_hint(cfg, kept)}.")
    images = cfg.data.batch_size * (n // kept)
    if images > MAX_BATCH:
        _fail(f"mask.scale_batch=true makes a masked micro-batch data.batch_size × {n // kept} = {images} images per "
              f"rank (at most {MAX_BATCH}); use a smaller data.batch_size, and train.grad_accum or more processes "
              f"for a larger global batch.")


def _ratio_hint(cfg, kept: int) -> str:
    """'e.g. mask.ratio=R (keeps K)' for the kept counts nearest `kept` that every check accepts: divisible by
    tp × cp (each rank holds an equal part of the kept tokens) and, with the token budget, dividing the tokens."""
    n, split = cfg.model.num_tokens, cfg.parallel.tp * cfg.parallel.cp
    fits = [k for k in range(1, n) if k % split == 0 and (not cfg.mask.scale_batch or n % k == 0)]
    if not fits:
        return "but none fits; use a smaller tp × cp" if split > 1 else "but none fits"
    near = sorted(sorted(fits, key=lambda k: (abs(k - kept), k))[:2])
    return "e.g. " + " or ".join(f"mask.ratio={1 - k / n:.6g} (keeps {k})" for k in near)


def _validate_model_parallel(cfg) -> None:
    """parallel.tp / sp / cp: what tensor, sequence and context parallelism can split (the process count is checked
    at start-up and by launch/submit.py, `parallel/layout.py`'s check_layout)."""
    p, m, moe = cfg.parallel, cfg.model, cfg.moe
    for key in ("tp", "cp"):
        if not isinstance(p[key], int) or p[key] < 1:
            _fail(f"parallel.{key} must be a positive integer (1: off), got {p[key]}.")
    split = p.tp * p.cp
    if split == 1:
        return
    which = " × ".join(f"parallel.{k}={p[k]}" for k in ("tp", "cp") if p[k] > 1)
    if p.engine != "fsdp":
        _fail(f"{which} needs parallel.engine=fsdp (FSDP2 composes with tensor and context parallelism; "
              f"parallel.engine={p.engine} does not), so set parallel.engine=fsdp.")
    if m.num_heads % split:
        _fail(f"model.num_heads={m.num_heads} must be divisible by tp × cp = {split} ({which}: each rank attends "
              f"with num_heads / {split} heads); choose a tp × cp that divides it.")
    if m.num_tokens % split:
        _fail(f"{which} splits each image's {m.num_tokens} tokens into {split} equal parts, which does not divide "
              f"them; choose a tp × cp that divides model.num_tokens (model.input_size / patch size, squared).")
    if cfg.mask.ratio > 0 and num_kept(m.num_tokens, cfg.mask.ratio) % split:
        kept = num_kept(m.num_tokens, cfg.mask.ratio)
        _fail(f"mask.ratio={cfg.mask.ratio} keeps {kept} of {m.num_tokens} tokens, which {which} cannot split into "
              f"{split} equal parts; choose another ratio, {_ratio_hint(cfg, kept)}.")
    widths = {"model.mlp_ratio × model.hidden_size (the dense FFN)": int(m.hidden_size * m.mlp_ratio)}
    if moe.num_experts and moe.shared_hidden:
        widths["moe.shared_hidden (the shared experts)"] = moe.shared_hidden
    for name, width in widths.items():
        if width % p.tp:
            _fail(f"{name} = {width} must be divisible by parallel.tp={p.tp} (tensor parallelism splits it).")
    if moe.num_experts and moe.router == "expert_choice":
        _fail(f"moe.router=expert_choice picks each expert's tokens among all of an image's tokens, which {which} "
              f"splits over ranks; use moe.router=token_choice with tensor or context parallelism.")
    if cfg.align.haste_weight > 0:
        _fail(f"align.haste_weight > 0 distils attention maps, whose heads {which} splits over ranks; use "
              f"parallel.tp=1 and parallel.cp=1 with HASTE (REPA and SRA work with both).")
    if cfg.eval.every:
        _fail(f"eval.every={cfg.eval.every} evaluates with every rank drawing its own images, while {which} makes "
              f"ranks share each image; set eval.every=0 and evaluate checkpoints with launch/evaluate.py "
              f"(parallel.tp=1 parallel.cp=1).")
