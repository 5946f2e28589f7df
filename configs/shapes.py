"""Stage 2 of the bundled shapes model: the UNet and the CLIP text encoder, trained together
on the frozen stage-1 autoencoder's latents.

Run: (after configs/shapes_vae.py and its export)
    jaxdiff train configs/shapes.py --workdir /work/runs/shapes-unet \\
        --set data_dir=/work/runs/shapes-data --set model=/work/runs/shapes-stage1
    jaxdiff export /work/runs/shapes-unet /work/runs/shapes-model

Random flips stay off: a flip would swap "left" and "right" against the caption.

Measured on two CPU cores (jax 0.10.2): 0.7 steps/s after a ~3 minute latent cache; after 500
of 2000 steps (12 minutes) the loss was 0.09 and `jaxdiff eval-shapes --n 40` gave 24% overall
attribute accuracy: the text encoder, trained from scratch, needs far more steps than that.
"""

import common


def get_config():
    return common.base(
        task="unet",
        model="/work/runs/shapes-stage1",
        train_text_encoder=True,
        resolution=64,
        random_flip=False,
        cache_latents=True,
        batch_size=32,
        steps=4000,
        learning_rate=1e-3,
        warmup_steps=100,
        lr_schedule="cosine",
        min_lr_ratio=0.05,
        caption_dropout=0.1,
        min_snr_gamma=5.0,
        ema_decay=0.999,
        checkpoint_every=250,
        sample_every=500,
        sample_prompts=(
            "a large red circle in the center on a blue background",
            "a small yellow square on the left on a black background",
            "a large green triangle in the center on a white background",
            "a small purple circle on the top and a small orange square on the bottom on a green background",
        ),
        sample_steps=20,
        seed=0,
    )
