"""Tools that write dit_scale shard folders: make_synthetic (the quickstart's labelled shapes), build_shards (image
folders or lists to VAE latents, teacher features or pixels) and writer (the tar and member writing they share).

    python -m data_tools.make_synthetic --out data/synthetic      # or dit-make-synthetic, or the file path
    python -m data_tools.build_shards --images DIR --out DIR --vae PATH      # or dit-build-shards
"""
