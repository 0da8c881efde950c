"""The text encoder of a text-to-image run: a local transformers T5 encoder or CLIP text model and its tokenizer.
The shard builder stores its caption features with it, and `launch/sample.py` encodes prompts with the same one, so a
prompt's features are computed exactly as the training captions' were.

    encoder = TextEncoder("/models/t5-v1_1-xxl", max_length=120, device="cuda")
    features, mask = encoder(["a small red circle in the top left"])   # float32 [B, L, T] (0 at padding), bool [B, L]
    encoder.info()            # {"path", "name", "model_type", "class", "width", "max_length"}: the manifest's record
    read_text_encoder_config("/models/t5-v1_1-xxl")["width"]           # T without loading the weights

Nothing is downloaded: the folder must hold config.json, the weights (safetensors, or a .bin that transformers reads
with `torch.load(weights_only=True)`) and the tokenizer files (tokenizer.json, spiece.model, or vocab.json and
merges.txt: a folder without them is refused, as transformers would encode every word as <unk>); a folder that
cannot be read is a one-sentence ConfigError. T5 checkpoints of a whole encoder-decoder load their encoder half.
Captions are padded to `max_length` and longer ones truncated; the mask marks the real tokens (T5: the caption's
tokens and its </s>). On a GPU the encoder runs in bfloat16 (T5 is not safe in float16); the features are returned
in float32 and stored as float16 by the data tools.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from dit_scale.config.external import read_text_encoder_config
from dit_scale.errors import ConfigError


# Each set is enough for AutoTokenizer: a fast tokenizer's file, T5's sentencepiece model, CLIP's BPE vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.json + merges.txt")


def has_tokenizer_files(path: str) -> bool:
    """Whether the folder `path` holds one of the TOKENIZER_FILES sets."""
    return any(all(os.path.isfile(os.path.join(path, name)) for name in group.split(" + "))
               for group in TOKENIZER_FILES)


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
        if not has_tokenizer_files(path):
            # transformers would build an empty vocabulary: every word <unk>, every caption the same features
            raise ConfigError(f"{field}={path!r} holds no tokenizer files ({' or '.join(TOKENIZER_FILES)}); copy "
                              f"the encoder's tokenizer files into it (a diffusers checkpoint keeps them in its "
                              f"tokenizer/ folder beside text_encoder/).")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")            # local folders only: never reach for the hub
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.path, self.max_length, self.device = os.path.abspath(path), int(max_length), torch.device(device)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = getattr(transformers, self.config["class"]).from_pretrained(path, local_files_only=True)
        except Exception as e:      # damaged files fail with many types (SafetensorError, KeyError, UnpicklingError)
            why = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200].rstrip(".")      # its first sentence
            raise ConfigError(f"{field}={path!r} cannot be loaded as a {self.config['class']} with its tokenizer "
                              f"({type(e).__name__}: {why}); the folder needs intact weights (safetensors, or a .bin "
                              f"of tensors only) and tokenizer files, as save_pretrained writes them.") from None
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
