"""Fine-tune an SDXL base model (a diffusers folder) on a folder of images, on one 80 GB GPU.

Run:
    jaxdiff train configs/sdxl.py --workdir runs/sdxl --set model=PATH/TO/sdxl-base-1.0 \
        --set data_dir=PATH/TO/IMAGES
    jaxdiff export runs/sdxl models/sdxl-finetuned

The hyperparameters of diffusers' SDXL example (examples/text_to_image, README_sdxl: learning
rate 1e-6, constant, 20% empty captions, 4 images per update, 10,000 updates, center crop and
random flip; it trains at 512 px with 8-bit Adam to fit smaller GPUs), here at SDXL's native
1024 px with AdamW, both text encoders frozen and each image's size ids (original size, crop,
target). The float32 weights, gradients, AdamW moments and EMA of the 2.6 B-parameter UNet take
51 GB: compute in bfloat16, the UNet's blocks rematerialized, the latents cached once; the
benchmark's sdxl-train row measures this setup (docs/benchmarks.md). On one GPU, let jax's
allocator take more than its default 75%: XLA_CLIENT_MEM_FRACTION=0.95. batch_size is global: on
several devices it must divide by their number (or set grad_accum; mesh_fsdp shards the state
over devices).
"""

import dataclasses

import sd15


def get_config():
    # configs/sd15.py's recipe (bfloat16, remat, cached latents, EMA 0.9999), at SDXL's settings.
    return dataclasses.replace(
        sd15.get_config(),
        resolution=1024,
        steps=10000,
        learning_rate=1e-6,
        caption_dropout=0.2,
    )
