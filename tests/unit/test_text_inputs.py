"""A text model's inputs that a user hands over: the local text-encoder folder (tokenizer files present, damaged files
refused with one sentence), the --prompts arguments (files vs prompts) and guidance on a model trained without
caption dropout (launch/sample.py refuses it as the config validator does)."""
import json
import os
import shutil

import pytest
import torch

from dit_scale.config import to_yaml
from dit_scale.errors import ConfigError
from dit_scale.generation.captions import read_prompts
from dit_scale.generation.text_encoder import TextEncoder, has_tokenizer_files
from tiny_text import TEXT_LEN, text_cfg, write_tiny_encoder

CAPTIONS = ["a small red circle in the top left", "a large blue square in the center"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return write_tiny_encoder(tmp_path_factory.mktemp("t5") / "t5")


def copy_of(encoder, tmp_path, name="enc") -> str:
    return shutil.copytree(encoder, str(tmp_path / name))


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".")


def test_the_tokenizer_is_the_folders_and_a_folder_without_one_is_refused(encoder, tmp_path):
    """Without tokenizer files transformers builds an empty vocabulary: every word <unk>, every caption the same
    features. With them, the ids are those of the folder's tokenizer.json, read directly."""
    from tokenizers import Tokenizer
    text_encoder = TextEncoder(encoder, TEXT_LEN)
    direct = Tokenizer.from_file(os.path.join(encoder, "tokenizer.json"))
    for caption in CAPTIONS:
        ids = text_encoder.tokenizer(caption)["input_ids"]
        assert ids == direct.encode(caption).ids and 2 not in ids        # 2: <unk>
    features, _ = text_encoder(CAPTIONS)
    assert (features[0] - features[1]).abs().max() > 0

    bare = copy_of(encoder, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):        # config.json and model.safetensors stay
        os.remove(os.path.join(bare, name))
    with pytest.raises(ConfigError) as err:
        TextEncoder(bare, TEXT_LEN)
    message = str(err.value)
    assert bare in message and "no tokenizer files" in message and "tokenizer/" in message, message
    assert one_sentence(message), message


def test_each_tokenizer_file_set_counts(tmp_path):
    """tokenizer.json (fast tokenizers), spiece.model (T5's sentencepiece), vocab.json with merges.txt (CLIP)."""
    for files, expected in [((), False), (("tokenizer_config.json",), False), (("tokenizer.json",), True),
                            (("spiece.model",), True), (("vocab.json",), False), (("merges.txt",), False),
                            (("vocab.json", "merges.txt"), True)]:
        folder = tmp_path / "_".join(files or ("none",))
        folder.mkdir()
        for name in files:
            (folder / name).write_text("")
        assert has_tokenizer_files(str(folder)) == expected, files


def truncate_weights(folder):
    with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
        f.truncate(10)


def empty_tokenizer(folder):
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write("{}")


def config_list(folder):
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump([1, 2], f)


class RunsCode:
    """A pickle that would run code when loaded (it touches `marker`)."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_weights(folder):
    from safetensors.torch import load_file
    weights = load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    weights["extra"] = RunsCode(os.path.join(folder, "RAN"))
    torch.save(weights, os.path.join(folder, "pytorch_model.bin"))


@pytest.mark.parametrize("damage, words", [(truncate_weights, "SafetensorError"), (empty_tokenizer, "KeyError"),
                                           (config_list, "config.json holds a JSON list"),
                                           (pickle_weights, "UnpicklingError")])
def test_a_damaged_encoder_folder_is_one_sentence(encoder, tmp_path, damage, words):
    folder = copy_of(encoder, tmp_path)
    damage(folder)
    with pytest.raises(ConfigError) as err:
        TextEncoder(folder, TEXT_LEN, field="model.text_encoder")
    message = str(err.value)
    assert message.startswith(f"model.text_encoder={folder!r}") and words in message, message
    assert one_sentence(message), message
    assert not os.path.exists(os.path.join(folder, "RAN"))             # weights_only refused the pickle


def test_prompt_files_and_prompts(tmp_path):
    listed = tmp_path / "prompts.txt"
    listed.write_text("# a comment\na large blue square\n\n  a small ring  \n", encoding="utf-8")
    assert read_prompts([str(listed), " a red circle ", "a red/blue circle", "red"]) == [
        "a large blue square", "a small ring", "a red circle", "a red/blue circle", "red"]

    latin = tmp_path / "latin.txt"
    latin.write_bytes("un cercle rouge à gauche\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        read_prompts([str(latin)])
    assert str(latin) in str(err.value) and "UTF-8" in str(err.value) and one_sentence(str(err.value))


@pytest.mark.parametrize("item, words", [("{tmp}/no_such_prompts.txt", "no such file"),
                                         ("prompts.TSV", "no such file"), ("captions.csv", "no such file"),
                                         ("{tmp}/prompts", "no such file"), ("./prompts", "no such file"),
                                         ("{tmp}", "is a folder")])
def test_an_argument_that_looks_like_a_path_is_not_a_prompt(tmp_path, item, words):
    item = item.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as err:
        read_prompts(["a red circle", item])
    assert repr(item) in str(err.value) and words in str(err.value) and one_sentence(str(err.value))


def write_export(cfg, path) -> str:
    """An exported file (launch/export.py's format) of a fresh model of `cfg`."""
    from safetensors.torch import save_file
    from dit_scale.build import build
    weights = {k: v.detach().clone().contiguous() for k, v in build(cfg).model.state_dict().items()}
    save_file(weights, path, metadata={"format": "dit_scale", "config": to_yaml(cfg), "step": "0",
                                       "weights": "model"})
    return path


def test_guidance_needs_a_text_model_trained_with_caption_dropout(encoder, tmp_path, capsys):
    """The validator refuses diffusion.cfg_scale != 1 with model.caption_dropout=0; --cfg-scale must not bypass it."""
    from launch.sample import main
    ckpt = write_export(text_cfg("model.caption_dropout=0"), str(tmp_path / "model.safetensors"))
    common = ["--ckpt", ckpt, "--prompts", CAPTIONS[0], "--text-encoder", encoder, "--steps", "1",
              "--per-prompt", "1", "--device", "cpu"]
    capsys.readouterr()
    assert main(common + ["--cfg-scale", "4", "--out", str(tmp_path / "guided.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --cfg-scale 4.0 ") and "caption_dropout=0" in err[0], err
    assert not os.path.exists(tmp_path / "guided.png")
    assert main(common + ["--cfg-scale", "1", "--out", str(tmp_path / "plain.png")]) == 0
    assert os.path.exists(tmp_path / "plain.png")


def test_guidance_needs_a_class_model_trained_with_class_dropout(tmp_path, capsys):
    """The same rule for a class model: without class dropout it has no null class to guide against."""
    from launch.sample import main
    from tiny import tiny_cfg
    ckpt = write_export(tiny_cfg("model.class_dropout=0"), str(tmp_path / "model.safetensors"))
    capsys.readouterr()
    assert main(["--ckpt", ckpt, "--cfg-scale", "4", "--steps", "1", "--device", "cpu",
                 "--out", str(tmp_path / "guided.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "null class" in err[0] and "class_dropout=0" in err[0], err
