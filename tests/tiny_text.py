"""The text-to-image pieces the tests build locally: a tiny random T5 encoder with its tokenizer
(data_tools/make_text_encoder.py) and captioned synthetic shards holding its caption features
(data_tools/make_synthetic.py --captions --text-encoder); nothing is downloaded.

    encoder = write_tiny_encoder(tmp / "t5")                      # width TEXT_DIM
    shards = write_text_shards(tmp / "shards", encoder)           # 64 captioned 16×16 images, 4 classes, 2 shards
    cfg = text_cfg("moe.top_k=1")                                 # the tiny model, conditioned on captions
    cfg = load_config(None, text_overrides(shards, run_dir, **{"train.steps": 4}))
"""
from tiny import TINY_MODEL, TINY_RUN, as_overrides, tiny_cfg

TEXT_DIM, TEXT_LEN = 16, 12
TEXT = {"model.conditioning": "text", "model.text_dim": TEXT_DIM, "model.text_len": TEXT_LEN}


def write_tiny_encoder(out, width: int = TEXT_DIM) -> str:
    from data_tools.make_text_encoder import make_text_encoder
    return make_text_encoder(str(out), width=width, layers=1, heads=2, seed=0)


def write_text_shards(out, encoder: str, num_samples: int = 64, samples_per_shard: int = 32, seed: int = 0) -> str:
    from data_tools.make_synthetic import make_synthetic
    make_synthetic(str(out), num_samples=num_samples, num_classes=4, size=16, samples_per_shard=samples_per_shard,
                   seed=seed, captions=True, text_encoder=encoder, max_length=TEXT_LEN)
    return str(out)


def text_cfg(*extra, **fields):
    return tiny_cfg(*extra, **{**TEXT, **fields})


def text_overrides(data_path, run_dir, **extra) -> list:
    return as_overrides({**TINY_MODEL, **TINY_RUN, **TEXT, "data.path": data_path, "train.run_dir": run_dir,
                         **extra})
