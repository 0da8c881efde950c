"""The config.json of the local model folders a config names, read without loading their weights: what `resolve.py`
derives from them (model.text_dim, align.teacher_dim) and what `validate.py` checks against them.

    read_text_encoder_config("/models/t5-v1_1-xxl")["width"]      # a T5 encoder / CLIP text model: its width
    read_teacher_config("weights/dinov2-base")["hidden_size"]     # a DINOv2 teacher

They live in the config package so that it imports nothing above it: `dit_scale/generation/text_encoder.py` and
`dit_scale/align/teacher.py` load those models.
"""
from __future__ import annotations

import json
import os

ENCODER_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                   "clip_text_model": "CLIPTextModel", "clip": "CLIPTextModel"}


def read_text_encoder_config(path: str) -> dict:
    """{"model_type", "class", "width"} of the text encoder in the local folder `path` (from its config.json);
    OSError / ValueError when it is missing or not a T5 encoder / CLIP text model."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"its config.json holds a JSON {type(config).__name__}, not an object")
    model_type = config.get("model_type")
    if model_type not in ENCODER_CLASSES:
        raise ValueError(f"its config.json has model_type={model_type!r}, not a T5 encoder or a CLIP text model "
                         f"({', '.join(ENCODER_CLASSES)})")
    if model_type == "clip":                     # a whole CLIP model's config: the text tower's part
        config = config.get("text_config") or {}
        if not isinstance(config, dict):
            raise ValueError("its config.json's text_config is not a JSON object")
    width = config.get("d_model") or config.get("hidden_size")
    if not isinstance(width, int) or width < 1:
        raise ValueError("its config.json names no d_model / hidden_size")
    return {"model_type": model_type, "class": ENCODER_CLASSES[model_type], "width": int(width)}


def read_teacher_config(path: str) -> dict:
    """The teacher's config.json (hidden_size, num_hidden_layers, num_attention_heads, patch_size, ...)."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size") if k not in cfg]
    if missing:
        raise ValueError(f"config.json has no {', '.join(missing)}")
    return cfg
