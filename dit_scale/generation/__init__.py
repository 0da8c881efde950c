"""Turning a trained model into images: what sampling needs beyond the samplers of diffusion/.

    sampling.py      class-conditional sample grids, each row titled with its class name
    vae.py           latents decoded through the VAE the shards were built with; pixels as they are
    captions.py      a text model's captions for samples (held-out shards' or encoded prompts), prompt grids
    text_encoder.py  a local T5 encoder / CLIP text model: captions → token features and masks (the shard builder's
                     and evaluation/grid.py's, so prompts are encoded as the training captions were)

evaluation/ (and, through it, the trainer's periodic grids and launch/sample.py's `evaluation/grid.py`) uses it;
it imports nothing above models/, diffusion/, data/, config/ and errors.py.
"""
