"""Stage 2 of the bundled shapes model: the UNet and the CLIP text encoder, trained together
on the frozen stage-1 autoencoder's latents, with the epsilon objective and Min-SNR weighting.

Run: (after configs/shapes_vae.py and its export)
    jaxdiff train configs/shapes.py --workdir RUNS/shapes-unet \\
        --set data_dir=RUNS/shapes-data --set model=RUNS/shapes-stage1
    jaxdiff export RUNS/shapes-unet RUNS/shapes-stage2

The run stops at step 2750 of a 5000-step cosine schedule (`schedule_steps`), then stage 3
(configs/shapes_v.py) continues it with v-prediction. Random flips stay off: a flip would swap
"left" and "right" against the caption.

Measured on two CPU cores (jax 0.10.2): about 1.0 step/s after a 3-minute latent cache; the
2750 steps took 52 minutes of wall time, with other work on the machine. At step 2500, `jaxdiff eval-shapes --model <export> --n 64` read
background 100%, colors 93%, shapes 64%, sizes 83%, but positions 24% (chance is 20%): the
layout is decided at high noise, where this objective gives almost no weight (configs/shapes_v.py).
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
        steps=2750,
        schedule_steps=5000,
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
