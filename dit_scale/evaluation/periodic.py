"""What the trainer evaluates while it trains: `eval.every` steps a validation loss and optionally a small FID, and
its sample grids, decoded and titled.

    evaluation = TrainingEvaluation(cfg, topology, objective, device)     # once, in Trainer.__init__
    if evaluation.due(step):
        log.log(step, evaluation.run(step, engine))                       # every rank (forwards are collective)
    evaluation.write_grid(engine, step, path)                             # every rank; rank 0 writes the PNG

The validation loss (`evaluation/val_loss.py`) needs `eval.val_path`; the FID needs `eval.fid_samples`,
`eval.inception` and `eval.ref` (`evaluation/evaluator.py`; a shards:PATH reference is computed at the first
evaluation and cached). Both use the EMA weights unless eval.ema=false. The row logged: val_loss (and per t bin),
fid, sfid, inception_score, precision, recall, and eval/* describing how the images were drawn. A text model's FID
samples are conditioned on held-out captions (`generate.eval_conditions`) and its grids show the first captions of
the training shards, one row per caption.
"""
from __future__ import annotations

import contextlib
import os

from dit_scale.diffusion.sampler_names import DEFAULT_SAMPLER
from dit_scale.errors import ConfigError
from dit_scale.evaluation.evaluator import evaluate_samples, metrics_row
from dit_scale.evaluation.generate import SamplingSpec, eval_conditions
from dit_scale.evaluation.inception import load_inception, weights_fingerprint
from dit_scale.evaluation.reference import FeatureExtractor, load_reference
from dit_scale.evaluation.shard_samples import ShardSet
from dit_scale.evaluation.val_loss import ValidationLoss
from dit_scale.generation.captions import CaptionTable, training_caption_path, write_prompt_grid
from dit_scale.generation.sampling import class_grid, grid_title, save_class_grid
from dit_scale.generation.vae import data_manifest, image_decoder
from dit_scale.optim import resolve_precision


_NOT_LOADED = object()


class TrainingEvaluation:
    def __init__(self, cfg, topology, objective, device):
        self.cfg, self.topo, self.objective, self.device = cfg, topology, objective, device
        self.precision = resolve_precision(cfg.train.precision, device)
        e = cfg.eval
        self.val = ValidationLoss.from_config(cfg, objective, device) if e.every and e.val_path else None
        self.fid = bool(e.every and e.fid_samples)
        if self.fid and not os.path.isfile(e.inception):
            raise ConfigError(f"eval.inception={e.inception!r} is not a file; download the FID Inception weights once "
                              f"(docs/evaluation.md) and give their local path.")
        self._extractor = self._reference = self._conditions = None
        self._grid_captions = _NOT_LOADED
        # the FID decodes on every rank and needs a decoder now (a latent run without a known VAE fails here, before
        # training); grids need one on rank 0 only, loaded at the first grid
        self._decoder = image_decoder(cfg, device=device, required=True) if self.fid else _NOT_LOADED

    def due(self, step: int) -> bool:
        every = self.cfg.eval.every
        return bool(every) and (step % every == 0 or step == self.cfg.train.steps)

    def decoder(self):
        """The run's image decoder (VAE from the shards' manifest, or pixels; None: latents without a known VAE)."""
        if self._decoder is _NOT_LOADED:
            self._decoder = image_decoder(self.cfg, device=self.device)
        return self._decoder

    def _model(self, engine):
        return engine.sampling_module() if self.cfg.eval.ema else contextlib.nullcontext(engine.module)

    def run(self, step: int, engine) -> dict:
        """The evaluation row of `step` (every rank calls it; the numbers are the same on every rank)."""
        e, collective = self.cfg.eval, self.topo.world_size > 1
        row = {}
        with self._model(engine) as model:
            if self.val is not None:
                with self.precision.autocast():
                    row.update(self.val(model, self.topo.rank, self.topo.world_size, engine.all_reduce_sum_,
                                        collective_forward=collective))
            if self.fid:
                extractor, reference = self._fid_setup()
                result = evaluate_samples(model, self.objective, self.cfg, SamplingSpec.from_config(self.cfg),
                                          self.decoder(), extractor, reference, e.fid_samples,
                                          batch_size=e.batch_size, collective_forward=collective,
                                          conditions=self._fid_conditions(collective))
                row.update(metrics_row(result, ema=e.ema))
        return row

    def _fid_setup(self):
        if self._extractor is None:
            e = self.cfg.eval
            self._extractor = FeatureExtractor(load_inception(e.inception, self.device, field="eval.inception"),
                                               self.device, self.topo.rank, self.topo.world_size, e.batch_size,
                                               weights_fingerprint(e.inception))
            self._reference = load_reference(e.ref, self._extractor, num_samples=e.ref_samples, field="eval.ref")
        return self._extractor, self._reference

    def _fid_conditions(self, collective: bool):
        """A text model's captions of the FID samples (this rank's, loaded once); None for a class model."""
        if self.cfg.model.conditioning != "text":
            return None
        if self._conditions is None:
            e = self.cfg.eval
            self._conditions = eval_conditions(e, e.fid_samples, e.batch_size, self.topo.rank, self.topo.world_size,
                                               pad=collective)
        return self._conditions

    def write_grid(self, engine, step: int, path: str) -> str:
        """The class grid of `step` from the EMA model: every rank samples it (forwards may be collective), rank 0
        decodes and writes it. Returns the path on rank 0, "" elsewhere. A text model: one row per caption."""
        d = self.cfg.diffusion
        sampler = d.sampler or DEFAULT_SAMPLER[d.objective]
        if self.cfg.model.conditioning == "text":
            return self._write_caption_grid(engine, step, path, sampler)
        with engine.sampling_module() as model:
            samples = class_grid(model, self.objective, self.cfg, self.device, seed=self.cfg.train.seed)
        if not self.topo.is_main:
            return ""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return save_class_grid(samples, self.cfg, path, decoder=self.decoder(),
                               manifest=data_manifest(self.cfg.data)[0],
                               title=grid_title(self.cfg, step, sampler, d.sample_steps, d.cfg_scale))

    def _write_caption_grid(self, engine, step: int, path: str, sampler: str) -> str:
        """A text model's grid: the first logging.max_sample_classes captions of the training shards, one row each
        (none, with a note, when the shards have no manifest to read them by)."""
        cfg, d = self.cfg, self.cfg.diffusion
        if self._grid_captions is _NOT_LOADED:
            try:
                shards = ShardSet.open(training_caption_path(cfg.data), field="data.path")
                self._grid_captions = CaptionTable.from_shards(shards, cfg.logging.max_sample_classes, "data.path")
            except ConfigError as e:
                self._grid_captions = None
                if self.topo.is_main:
                    print(f"note: no sample grids for this text run ({e})", flush=True)
        if self._grid_captions is None:
            return ""
        with engine.sampling_module() as model:
            return write_prompt_grid(model, self.objective, cfg, self.device, self._grid_captions, path,
                                     per_prompt=cfg.logging.samples_per_class, seed=cfg.train.seed,
                                     write=self.topo.is_main, decoder=self.decoder() if self.topo.is_main else None,
                                     title=grid_title(cfg, step, sampler, d.sample_steps, d.cfg_scale))
