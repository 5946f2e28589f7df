"""Stage 6 of the bundled shapes model: the autoencoder's decoder, fine-tuned with its encoder
frozen, so the latents (and the UNet trained on them) stay as they are.

Why: stage 1 trained the VAE for 600 steps only. Its own round trips of held-out single-object
pictures scored 83% on shape (`jaxdiff eval-shapes --vae-reconstruction --n 400`; small white
circles came back square): an upper bound for the whole model.

Run: (after configs/shapes_zsnr.py, exported at its last step to RUNS/shapes-stage5)
    jaxdiff train configs/shapes_vae_decoder.py --workdir RUNS/shapes-decoder \\
        --set data_dir=RUNS/shapes-data --set model=RUNS/shapes-stage5
    jaxdiff export RUNS/shapes-decoder RUNS/shapes-model

Measured on two CPU cores: 1000 steps in 25 minutes of wall time; reconstruction MSE (one
batch) 0.0063 at the end of stage 1, 0.0015 at the end. The VAE's round trips: shape 83% -> 88%
on held-out single-object prompts, 91.2% -> 96.8% on all (--n 400). The whole model
(`eval-shapes --n 200`): overall 96.8% -> 98.2%, shape 87.7% -> 92.7%; held-out single-object
prompts 97.2% -> 97.6%.
"""

import dataclasses

import shapes_vae


def get_config():
    return dataclasses.replace(
        shapes_vae.get_config(),
        model="/work/runs/shapes-stage5",
        freeze_params=("vae/encoder", "vae/quant_conv"),
        steps=1000,
        learning_rate=1e-3,
        warmup_steps=20,
        seed=4,
    )
