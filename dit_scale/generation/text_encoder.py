"""The text encoder of a text-to-image run: a local transformers T5 encoder or CLIP text model and its tokenizer.
The shard builder stores its caption features with it, and `launch/sample.py` encodes prompts with the same one, so a
prompt's features are computed exactly as the training captions' were.

    encoder = TextEncoder("/models/t5-v1_1-xxl", max_length=120, device="cuda")
    features, mask = encoder(["a small red circle in the top left"])   # float32 [B, L, T] (0 at padding), bool [B, L]
    encoder.info()            # {"path", "name", "model_type", "class", "width", "max_length"}: the manifest's record
    read_text_encoder_config("/models/t5-v1_1-xxl")["width"]           # T without loading the weights

Nothing is downloaded: the folder must hold config.json, the weights (safetensors, or a .bin that transformers reads
with `torch.load(weights_only=True)`) and the tokenizer files (tokenizer.json / spiece.model). T5 checkpoints of a
whole encoder-decoder load their encoder half. Captions are padded to `max_length` and longer ones truncated; the
mask marks the real tokens (T5: the caption's tokens and its </s>). On a GPU the encoder runs in bfloat16 (T5 is
not safe in float16); the features are returned in float32 and stored as float16 by the data tools.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from dit_scale.config.external import read_text_encoder_config
from dit_scale.errors import ConfigError


class TextEncoder:
    """A local text encoder on one device (see the module docstring)."""

    def __init__(self, path: str, max_length: int, device="cpu", field: str = "--text-encoder"):
        try:
            self.config = read_text_encoder_config(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{field}={path!r} is not a local T5 encoder or CLIP text model folder "
                              f"({getattr(e, 'strerror', None) or e}); pass the folder the captions were encoded "
                              f"with (config.json, weights and tokenizer files).") from None
        if max_length < 1:
            raise ConfigError(f"The caption length for {field}={path!r} must be a positive number of tokens, got "
                              f"{max_length}.")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")            # local folders only: never reach for the hub
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.path, self.max_length, self.device = os.path.abspath(path), int(max_length), torch.device(device)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = getattr(transformers, self.config["class"]).from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{field}={path!r} cannot be loaded as a {self.config['class']} with its tokenizer "
                              f"({str(e).splitlines()[0]}); the folder needs the weights and the tokenizer "
                              f"files.") from None
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)

    @property
    def width(self) -> int:
        return self.config["width"]

    def info(self) -> dict:
        """What a manifest records about the encoder."""
        return {"path": self.path, "name": os.path.basename(self.path.rstrip("/")),
                "model_type": self.config["model_type"], "class": self.config["class"], "width": self.width,
                "max_length": self.max_length}

    @torch.no_grad()
    def __call__(self, captions: Sequence[str], batch_size: Optional[int] = None):
        """(features float32 [B, L, T] on the CPU, zero at padding; mask bool [B, L]) of `captions`, encoded
        `batch_size` at a time (default: all at once)."""
        captions = [str(c) for c in captions]
        step = batch_size or max(1, len(captions))
        features, masks = [], []
        for start in range(0, len(captions), step):
            tokens = self.tokenizer(captions[start:start + step], padding="max_length", max_length=self.max_length,
                                    truncation=True, return_tensors="pt")
            ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            masks.append(mask.bool().cpu())
            features.append((hidden.float() * mask.unsqueeze(-1)).cpu())
        if not features:
            return torch.zeros(0, self.max_length, self.width), torch.zeros(0, self.max_length, dtype=torch.bool)
        return torch.cat(features), torch.cat(masks)
