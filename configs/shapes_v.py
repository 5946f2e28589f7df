"""Stage 3 of the bundled shapes model: stage 2's UNet and text encoder, continued with
v-prediction and no Min-SNR weighting.

Why: the layout (where an object goes) is decided at the highest noise levels, where the text is
the only information. In terms of the x0 error, the epsilon loss weights a timestep by its SNR
and Min-SNR by min(SNR, gamma), both about 0.005 at t = 999, while the v loss weights it by
1 + SNR. After stage 2, `eval-shapes` read background, colors, shapes and sizes well but
positions at chance: the model had not learned "left", "top", ... at all.

Run: (after configs/shapes.py, exported at its last step to RUNS/shapes-stage2)
    jaxdiff train configs/shapes_v.py --workdir RUNS/shapes-v \\
        --set data_dir=RUNS/shapes-data --set model=RUNS/shapes-stage2
    jaxdiff export RUNS/shapes-v RUNS/shapes-stage3

The export writes prediction_type "v_prediction" into the scheduler config. The run stops at
step 1500 of a 3000-step schedule; stage 4 (configs/shapes_late.py) continues it.

Measured on two CPU cores: about 1.0 step/s, 1500 steps in 30 minutes of wall time. `jaxdiff eval-shapes
--n 64` on the EMA weights: positions 28% at step 1000 and 38% at step 1500 (overall 75% and
78%; background, colors and sizes 88-100%).
"""

import dataclasses

import shapes


def get_config():
    return dataclasses.replace(
        shapes.get_config(),
        model="/work/runs/shapes-stage2",
        prediction_type="v_prediction",
        min_snr_gamma=0.0,
        steps=1500,
        schedule_steps=3000,
        learning_rate=5e-4,
        sample_prompts=(
            "a large red circle in the center on a blue background",
            "a small yellow square on the left on a black background",
            "a large green triangle on the top on a white background",
            "a small purple circle on the top and a small orange square on the bottom on a green background",
        ),
        seed=1,
    )
