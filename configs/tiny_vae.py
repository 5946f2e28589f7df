"""The tiny autoencoder (the `tiny` preset's VAE, 32x32 images) trained on a toy dataset.

Run:
    python scripts/make_toy_dataset.py /tmp/toy
    jaxdiff train configs/tiny_vae.py --workdir /tmp/tiny-vae --set data_dir=/tmp/toy

Expected (measured on two CPU cores): about a second per step; the loss (reconstruction MSE
plus 1e-6 KL) falls from ~0.38 to ~0.30 in the first 6 steps and keeps falling; `samples/`
shows inputs above their reconstructions.
"""

import dataclasses

import tiny


def get_config():
    return dataclasses.replace(
        tiny.get_config(), task="vae", kl_weight=1e-6, learning_rate=1e-3, caption_dropout=0.0
    )
