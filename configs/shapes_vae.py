"""Stage 1 of the bundled shapes model: its autoencoder (64x64 images -> 16x16x4 latents).

Run:
    jaxdiff make-shapes /work/runs/shapes-data --n 20000 --seed 0
    jaxdiff train configs/shapes_vae.py --workdir /work/runs/shapes-vae \\
        --set data_dir=/work/runs/shapes-data
    jaxdiff export /work/runs/shapes-vae /work/runs/shapes-stage1

Then set the exported VAE's scaling_factor to 1 / (the std of its latents on the dataset) and
run stage 2 (configs/shapes.py). Measured on two CPU cores (jax 0.10.2): 600 steps in about
16 minutes (0.65 steps/s), reconstruction MSE 0.72 -> 0.0063, scaling_factor 1.04.
"""

import common


def get_config():
    return common.base(
        task="vae",
        model="shapes",
        resolution=64,
        random_flip=True,
        batch_size=16,
        steps=600,
        learning_rate=2e-3,
        warmup_steps=20,
        lr_schedule="cosine",
        min_lr_ratio=0.05,
        kl_weight=1e-6,
        caption_dropout=0.0,
        ema_decay=0.99,
        checkpoint_every=200,
        sample_every=200,
        seed=0,
    )
