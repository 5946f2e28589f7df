"""Fine-tune a Stable Diffusion 1.x / 2.x model (a diffusers folder) on a folder of images.

Run:
    jaxdiff train configs/sd15.py --workdir runs/sd15 --set model=PATH/TO/stable-diffusion-v1-5 \
        --set data_dir=PATH/TO/IMAGES
    jaxdiff export runs/sd15 models/sd15-finetuned

The hyperparameters of diffusers' SD 1.5 example (examples/text_to_image README: learning rate
1e-5, constant, gradient clipping at 1, an EMA of the weights, 15,000 updates of 4 images at
512 px, center crop and random flip), in bfloat16 with float32 master weights, the UNet's blocks
rematerialized and the latents cached once, as the benchmark's sd15-train row measures it
(docs/benchmarks.md). batch_size is global: on several devices it must divide by their number
(or set grad_accum).
"""

import common


def get_config():
    return common.base(
        model="",  # a diffusers folder: --set model=PATH
        resolution=512,
        batch_size=4,
        steps=15000,
        learning_rate=1e-5,
        lr_schedule="constant",
        ema_decay=0.9999,
        caption_dropout=0.1,
        compute_dtype="bfloat16",
        remat=True,
        cache_latents=True,
        checkpoint_every=500,
        keep_checkpoints=2,
    )
