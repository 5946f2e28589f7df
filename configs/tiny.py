"""The tiny text-to-image model (preset `tiny`, 32x32 images) trained on a toy dataset, on the CPU.

Run:
    python scripts/make_toy_dataset.py /tmp/toy
    jaxdiff train configs/tiny.py --workdir /tmp/tiny-run --set data_dir=/tmp/toy
    jaxdiff export /tmp/tiny-run /tmp/tiny-model

Expected (measured on two shared CPU cores, session 5, with the `jaxdiff` command's CPU
settings): 7-11 steps/s after a ~15 s compile; the loss falls from ~1.3 to ~0.4 within the first
30 steps; `samples/` holds one-step denoising previews (inputs on top, predictions below) every
100 steps.
"""

import common


def get_config():
    return common.base(
        model="tiny",
        resolution=32,
        batch_size=8,
        steps=300,
        learning_rate=1e-3,
        warmup_steps=20,
        lr_schedule="cosine",
        min_lr_ratio=0.1,
        ema_decay=0.99,
        caption_dropout=0.1,
        checkpoint_every=100,
        sample_every=100,
    )
