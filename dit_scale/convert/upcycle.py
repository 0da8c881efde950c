"""Sparse upcycling: a dense DiT becomes a DiT-MoE whose output at conversion is the dense model's.

    spec = UpcycleSpec(num_experts=8, top_k=2, shared_ratio=0.0)        # DiT-XL/2 -> DiT-XL/2-8E2A
    model, cfg = upcycle(dense_weights, dense_cfg, spec)                # our MoE model and its resolved config
    scores = taylor_scores(dense_model, objective, batches)             # Dense2MoE's importance (mode="split")

**Experts keep the dense FFN's activation.** DiT's FFN is Linear → GELU(tanh) → Linear with biases; DiT-MoE's
experts are bias-free SwiGLU. No SwiGLU computes a GELU MLP (GELU(z) = z·Φ(z) needs the gate to be a cubic of z inside
a sigmoid, SwiGLU's gate is linear in x, and there is no bias to carry fc1's), so an upcycled model uses experts of
the dense FFN's own kind: `moe.expert_act=gelu` (`models/moe.py`: w13 = fc1ᵀ, b1, w2 = fc2ᵀ, b2 per expert; the
shared expert, if any, is a GELU MLP too). Its grouped GEMM, expert parallelism, every engine and the checkpoints
treat those tensors as any expert's.

Modes (routing: token choice over softmax scores with the top-k weights renormalised to sum to 1,
`moe.normalize_topk=true`, written into the config):

* **copy** (default; Komatsuzaki et al.'s sparse upcycling): every routed expert is the dense FFN (fc1, b1, fc2, b2;
  its hidden size padded with zero units to a multiple of 8, which add exactly 0). With the weights of a token's k
  experts summing to 1, Σ_e w_e·FFN(x) = FFN(x) whatever the router says, so the router is drawn from the model's
  own init (N(0, 0.02), or `router_std`) and breaks the symmetry between the copies as training starts. A shared
  expert (`shared_ratio` > 0) starts with fc1 from the init rule and fc2 = 0 (and zero biases): it adds 0.
  **Exact**: the output equals the dense output for every input, up to float rounding (the weights' sum is 1 to
  an ulp; the expert GEMMs sum in another order): ≤ 1e-12 relative in float64, ~1e-6 in float32 (tests check both).
  `noise` > 0 adds N(0, (noise · std of the dense matrix)²) to each copy's fc1 and fc2 (independently per expert):
  no longer exact, by design.
* **split** (Dense2MoE): the dense FFN's H hidden units are partitioned. The shared expert takes the S most important
  units (S = shared_ratio × width, rounded up to a multiple of 8) by the first-order Taylor score
  Σ |w · ∂L/∂w| over each unit's fc1 row, fc1 bias and fc2 column, with the gradient of the training loss summed
  over a calibration batch (`taylor_scores`); the other units, most important first, are dealt round-robin to the E
  experts (expert e gets ranks e, e + E, ...), so their importance is balanced; each expert's fc2 (not b2) is scaled
  by E. **Exact when top_k == num_experts** (then the router starts at zero: each weight is 1/E, and
  Σ_e (1/E)·(E·slice_e(x) + b2) + shared(x) is the dense FFN). With top_k < num_experts it is an approximation: a
  token gets the shared units and k of the E slices, scaled by E/k on average (unbiased over a uniformly random
  choice of experts, not equal); Dense2MoE recovers the rest by fine-tuning / distillation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import torch

from dit_scale.build import build
from dit_scale.config import hidden_size_for
from dit_scale.convert.common import derive_config
from dit_scale.errors import CheckpointError, ConfigError
from dit_scale.models.registry import parse_model_name

MODES = ("copy", "split")
FRESH = ("align_heads.", "mask_token")  # training-time additions a dense file may lack: drawn like the router
MULTIPLE = 8                    # expert hidden sizes are multiples of 8 (grouped GEMM alignment, `config/resolve.py`)


@dataclass(frozen=True)
class UpcycleSpec:
    num_experts: int
    top_k: int
    shared_ratio: float = 0.0               # shared expert hidden = ratio × width (rounded up to 8); 0: none
    mode: str = "copy"                      # copy | split
    noise: float = 0.0                      # copy: relative std of the noise on each copy (0: exact)
    router_std: Optional[float] = None      # None: the model's router init, N(0, 0.02); 0: zeros
    seed: int = 0                           # the init of router / shared expert and the noise


def _round_up(n: int) -> int:
    return MULTIPLE * math.ceil(n / MULTIPLE)


def expert_sizes(dense_cfg, spec: UpcycleSpec) -> Tuple[int, int]:
    """(routed expert hidden, shared hidden) of the upcycled model."""
    width, hidden = dense_cfg.model.hidden_size, int(dense_cfg.model.hidden_size * dense_cfg.model.mlp_ratio)
    shared = hidden_size_for(width, spec.shared_ratio)
    if spec.mode == "copy":
        return _round_up(hidden), shared
    if shared > hidden - spec.num_experts:
        raise ConfigError(f"--shared-ratio {spec.shared_ratio} gives the shared expert {shared} of the dense FFN's "
                          f"{hidden} hidden units, leaving fewer than one per routed expert; use a smaller ratio.")
    return _round_up(math.ceil((hidden - shared) / spec.num_experts)), shared


def upcycled_config(dense_cfg, spec: UpcycleSpec, overrides: Iterable[str] = ()):
    """The resolved config of the upcycled model: the dense config with `-{E}E{k}A`, GELU experts of the sizes the
    mode gives, token choice with normalised top-k softmax weights; `overrides` (key=value) applied last."""
    if spec.mode not in MODES:
        raise ConfigError(f"--mode {spec.mode!r} is not one of {', '.join(MODES)}.")
    if dense_cfg.moe.num_experts:
        raise ConfigError(f"model.name={dense_cfg.model.name} is already a mixture of experts; upcycle a dense DiT.")
    if not 1 <= spec.top_k <= spec.num_experts:
        raise ConfigError(f"--top-k {spec.top_k} must be between 1 and --experts {spec.num_experts}.")
    values = [spec.noise, spec.shared_ratio] + ([spec.router_std] if spec.router_std is not None else [])
    if not all(math.isfinite(v) and v >= 0 for v in values):        # nan passes a "< 0" check
        raise ConfigError("--noise, --shared-ratio and --router-std must be finite numbers >= 0.")
    if spec.noise and spec.mode != "copy":
        raise ConfigError("--noise applies to --mode copy only (split experts already differ).")
    name = dense_cfg.model.name
    spec_name = parse_model_name(name)
    if spec_name.num_experts:
        raise ConfigError(f"model.name={name} already names experts; upcycle a dense DiT.")
    width = dense_cfg.model.hidden_size
    routed, shared = expert_sizes(dense_cfg, spec)
    changes = {"model.name": f"{name}-{spec.num_experts}E{spec.top_k}A", "moe.num_experts": None, "moe.top_k": None,
               "moe.expert_hidden": None, "moe.shared_hidden": None, "moe.expert_act": "gelu",
               "moe.expert_mlp_ratio": routed / width, "moe.shared_mlp_ratio": shared / width,
               "moe.router": "token_choice", "moe.score_function": "softmax", "moe.normalize_topk": True,
               "moe.bias_update_rate": 0.0, "train.init_from": None}
    cfg = derive_config(dense_cfg, changes, overrides)
    if (cfg.moe.expert_hidden, cfg.moe.shared_hidden) != (routed, shared):
        raise ConfigError(f"the overrides change the expert sizes ({cfg.moe.expert_hidden}, {cfg.moe.shared_hidden}) "
                          f"from what --mode {spec.mode} builds ({routed}, {shared}); leave moe.*_mlp_ratio alone.")
    for key in ("moe.expert_act", "moe.router", "moe.score_function", "moe.normalize_topk"):
        section, field = key.split(".")
        if cfg[section][field] != changes[key]:
            raise ConfigError(f"{key}={cfg[section][field]} breaks the equality at conversion (it needs "
                              f"{changes[key]}); change it when fine-tuning if you must, not here.")
    return cfg


def _pad(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """`t` with zeros appended along `dim` up to `size` (zero hidden units add exactly 0: GELU(0) = 0)."""
    extra = size - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


@torch.no_grad()
def upcycle(dense: Dict[str, torch.Tensor], dense_cfg, spec: UpcycleSpec, overrides: Iterable[str] = (),
            scores: Optional[Dict[int, torch.Tensor]] = None):
    """(the upcycled model on the CPU in fp32, its resolved config) from the dense weights `dense` (our names) and
    their config. `scores` {block: [H]} (mode split): the hidden units' importance (`taylor_scores`)."""
    cfg = upcycled_config(dense_cfg, spec, overrides)
    if spec.mode == "split" and scores is None:
        raise ConfigError("--mode split ranks the hidden units by a Taylor score on a calibration batch: pass "
                          "--calib-data SHARDS (or scores to `upcycle`).")
    built = build(cfg, device="meta", seed=spec.seed)  # allocated here; only what is not copied is drawn below
    model = built.model
    model.to_empty(device="cpu")
    model.init_buffers_()
    state = model.state_dict()
    filled = set()
    num_experts, hidden = spec.num_experts, int(dense_cfg.model.hidden_size * dense_cfg.model.mlp_ratio)
    routed, shared = expert_sizes(dense_cfg, spec)
    gen = torch.Generator().manual_seed(spec.seed)
    moe_keys = set()
    for i in range(cfg.model.depth):
        get = _getter(dense, f"blocks.{i}.ffn.")
        fc1, b1, fc2, b2 = (get(k).float() for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
        if fc1.shape != (hidden, cfg.model.hidden_size):
            raise CheckpointError(f"'blocks.{i}.ffn.fc1.weight' is {list(fc1.shape)}, not the [{hidden}, "
                                  f"{cfg.model.hidden_size}] of model.mlp_ratio={dense_cfg.model.mlp_ratio}.")
        p = f"blocks.{i}.ffn."
        if spec.mode == "copy":
            units = [torch.arange(hidden)] * num_experts
            scale, shared_units = 1.0, None
        else:
            order = torch.argsort(scores[i].float(), descending=True, stable=True)
            shared_units, rest = order[:shared], order[shared:]
            units = [rest[e::num_experts] for e in range(num_experts)]
            scale = float(num_experts)
        w13 = torch.stack([_pad(fc1[u].t(), routed, 1) for u in units])
        w2 = torch.stack([_pad(fc2[:, u].t() * scale, routed, 0) for u in units])
        if spec.noise:
            real = torch.zeros(routed, dtype=torch.bool)
            real[:hidden] = True
            w13 += spec.noise * fc1.std() * torch.randn(w13.shape, generator=gen) * real
            w2 += spec.noise * fc2.std() * torch.randn(w2.shape, generator=gen) * real[:, None]
        values = {"experts.w13": w13, "experts.w2": w2, "experts.b2": b2.expand(num_experts, -1).clone(),
                  "experts.b1": torch.stack([_pad(b1[u], routed, 0) for u in units]),
                  "router.expert_bias": torch.zeros(num_experts)}
        if spec.mode == "split" and spec.top_k == num_experts:
            values["router.weight"] = torch.zeros(num_experts, cfg.model.hidden_size)    # weights 1/E: exact
        elif spec.router_std is not None:
            values["router.weight"] = torch.randn(num_experts, cfg.model.hidden_size, generator=gen) * spec.router_std
        if shared:
            if shared_units is None:                   # copy: a shared expert that adds 0 at conversion
                values.update({"shared.fc1.bias": torch.zeros(shared), "shared.fc2.weight": torch.zeros(
                    cfg.model.hidden_size, shared), "shared.fc2.bias": torch.zeros(cfg.model.hidden_size)})
            else:
                values.update({"shared.fc1.weight": fc1[shared_units], "shared.fc1.bias": b1[shared_units],
                               "shared.fc2.weight": fc2[:, shared_units],
                               "shared.fc2.bias": torch.zeros(cfg.model.hidden_size)})
        for key, value in values.items():
            state[p + key].copy_(value)
            filled.add(p + key)
        moe_keys |= {p + k for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
    for key, value in dense.items():
        if key in moe_keys:
            continue
        if key not in state or tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"the dense checkpoint's '{key}' {list(value.shape)} has no place in "
                                  f"{cfg.model.name}; it does not match its own config.")
        state[key].copy_(value)
        filled.add(key)
    for name, param in model.named_parameters():       # the router and a copy-mode shared fc1: the model's init
        if name in filled:
            continue
        if not (name.endswith("ffn.router.weight") or ".ffn.shared." in name or name.startswith(FRESH)):
            raise CheckpointError(f"the dense checkpoint has no '{name}'; it is not a complete "
                                  f"{dense_cfg.model.name}.")
        param.copy_(built.init.draw(name, param.shape))
    return model.eval(), cfg


def _getter(weights, prefix):
    def get(key):
        if prefix + key not in weights:
            raise CheckpointError(f"the dense checkpoint has no '{prefix + key}' (a dense DiT FFN); upcycle a dense "
                                  f"DiT (dit_scale's, or one converted with launch/convert.py --from dit).")
        return weights[prefix + key]
    return get


def taylor_scores(model, objective, batches: Iterable[dict], seed: int = 0) -> Dict[int, torch.Tensor]:
    """{block: [H]} first-order Taylor importance of every dense FFN hidden unit: Σ |w · g| over the unit's fc1 row,
    fc1 bias and fc2 column, g the gradient of the training loss (the objective's, mean over the batch) summed over
    `batches` ({"x", "y"}: clean data and labels). The model is left with those gradients zeroed."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    model.zero_grad(set_to_none=True)
    seen = 0
    for batch in batches:
        targets = objective.training_targets(batch["x"].float(), gen)
        out, _ = model(targets["x_t"], targets["t_model"], batch["y"])
        objective.loss(out, targets).mean().backward()
        seen += 1
    if not seen:
        raise ConfigError("the calibration data gave no batch; check --calib-data.")
    scores = {}
    for i, block in enumerate(model.blocks):
        fc1, fc2 = block.ffn.fc1, block.ffn.fc2
        scores[i] = ((fc1.weight * fc1.weight.grad).abs().sum(1) + (fc1.bias * fc1.bias.grad).abs()
                     + (fc2.weight * fc2.weight.grad).abs().sum(0)).detach()
    model.zero_grad(set_to_none=True)
    return scores


def calibration_scores(dense, cfg, *, data: Optional[str] = None, batches: int = 8, batch_size: int = 16,
                       seed: int = 0) -> Dict[int, torch.Tensor]:
    """`taylor_scores` of the dense model (config `cfg`) on `batches` batches of `batch_size` from `data` (shards,
    their own manifest; default the config's data.path and data.manifest), read in order (no shuffle, no flip):
    mode="split"'s importance (--calib-data, --calib-batches, --calib-batch-size)."""
    import argparse

    from dit_scale.build import build_objective
    from dit_scale.data import build_loader
    data_cfg = cfg.data
    path = data or data_cfg.path
    node = {"path": path, "sources": [], "weights": [], "batch_size": batch_size, "shuffle_buffer": 0,
            "hflip": False, "image_key": data_cfg.image_key, "num_workers": 0, "mode": "epoch", "steps_per_epoch": 0,
            "manifest": None if data else data_cfg.manifest}
    m = cfg.model
    loader = build_loader(argparse.Namespace(**node), seed=seed,
                          expect={"x": (m.in_channels, m.input_size, m.input_size), "num_classes": m.num_classes})
    try:
        calibration = [next(loader) for _ in range(batches)]
    finally:
        loader.close()
    return taylor_scores(dense, build_objective(cfg), calibration, seed=seed)


@torch.no_grad()
def max_difference(dense, model, model_cfg, seed: int = 0) -> float:
    """max |upcycled - dense| of the two models' outputs on one random batch of 2 (inputs, times and labels drawn
    from `seed`; shapes from `model_cfg`, the config's model section): the upcycle's check."""
    m = model_cfg
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m.in_channels, m.input_size, m.input_size, generator=g)
    t = torch.rand(2, generator=g) * 999
    y = torch.randint(0, max(1, m.num_classes), (2,), generator=g)
    return (model(x, t, y)[0] - dense(x, t, y)[0]).abs().max().item()
