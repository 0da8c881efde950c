"""Write a tiny random-weight T5 encoder and its tokenizer to a local folder: the text encoder of the captioned
quickstart and of the tests (nothing is downloaded). Real runs use a real encoder's local folder instead (e.g. a
T5-v1.1-XXL or CLIP text model saved with `save_pretrained`).

    python -m data_tools.make_text_encoder --out data/tiny_t5
    python -m data_tools.make_text_encoder --out data/tiny_t5 --words prompts.txt --width 64 --layers 2
    # the same: dit-make-text-encoder ... (console script) or python data_tools/make_text_encoder.py ...

The tokenizer is a word-level `tokenizers` model (lowercase, split on whitespace and punctuation; <pad> = 0,
</s> = 1 appended to every caption, <unk> = 2) whose vocabulary is every word data_tools/make_synthetic.py's
captions use, plus the words of the --words files (any text: prompt files, caption lists). The encoder is a
transformers `T5EncoderModel` built from a small config (--width d_model, --layers, --heads) with weights drawn from
--seed, saved as safetensors: the same arguments write the same folder. Its features carry no language knowledge,
only which words stand where, which is all the synthetic captions need.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Iterable, Optional

from data_tools.make_synthetic import caption_words
from dit_scale.cli import check_output_dir
from dit_scale.errors import ConfigError

SPECIAL = ("<pad>", "</s>", "<unk>")
WORD = re.compile(r"\w+|[^\w\s]+")   # what pre_tokenizers.Whitespace splits


def vocabulary(extra_files: Iterable[str] = ()) -> dict[str, int]:
    """{token: id}: the special tokens, the synthetic captions' words, then the words of `extra_files` (sorted)."""
    words = set(caption_words())
    for path in extra_files:
        with open(path, encoding="utf-8") as f:
            words.update(WORD.findall(f.read().lower()))
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    for word in sorted(words - set(SPECIAL)):
        vocab[word] = len(vocab)
    return vocab


def make_text_encoder(out: str, words: Iterable[str] = (), width: int = 32, layers: int = 2, heads: int = 4,
                      max_length: int = 64, seed: int = 0) -> str:
    """Write the tokenizer and the random T5 encoder into `out`; returns `out`."""
    if width < heads or width % heads or layers < 1 or heads < 1 or max_length < 2:
        raise ValueError("need --width a multiple of --heads, --layers >= 1, --heads >= 1 and --max-length >= 2")
    import torch
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    vocab = vocabulary(words)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>", model_max_length=max_length)
    config = transformers.T5Config(vocab_size=len(vocab), d_model=width, d_kv=width // heads, num_heads=heads,
                                   num_layers=layers, d_ff=2 * width, dropout_rate=0.0, pad_token_id=0,
                                   eos_token_id=1, decoder_start_token_id=0)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = transformers.T5EncoderModel(config).eval()
    finally:
        torch.random.set_rng_state(state)
    os.makedirs(out, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/tiny_t5")
    parser.add_argument("--words", nargs="*", default=[], help="text files whose words join the vocabulary")
    parser.add_argument("--width", type=int, default=32, help="d_model: the width of the caption features")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64, help="the tokenizer's model_max_length")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        check_output_dir(args.out, "--out")
        make_text_encoder(args.out, args.words, args.width, args.layers, args.heads, args.max_length, args.seed)
    except (ConfigError, OSError, ValueError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    print("tiny T5 encoder (width %d, %d layers, vocabulary %d words) in %s"
          % (args.width, args.layers, len(vocabulary(args.words)), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
