"""The recipe of jaxdiff's bundled shapes model, end to end and reproducible from its seeds.

    python scripts/train_shapes_model.py --runs /work/runs

1. `jaxdiff make-shapes RUNS/shapes-data --n 20000 --seed 0` (held-out pairs excluded);
2. stage 1, `configs/shapes_vae.py`: the autoencoder, exported to RUNS/shapes-stage1, its
   `scaling_factor` set to 1 / (standard deviation of its latents on 512 images) so the
   diffusion model sees unit-variance latents, and its UNet replaced by a fresh
   `jaxdiff init shapes --seed 0` one;
3. stage 2, `configs/shapes.py`: the UNet and the CLIP text encoder on the frozen VAE's latents
   (epsilon objective, Min-SNR), exported to RUNS/shapes-stage2;
4. stage 3, `configs/shapes_v.py`: the same continued with v-prediction (positions),
   exported to RUNS/shapes-stage3;
5. stage 4, `configs/shapes_late.py`: continued with the noisiest timesteps drawn more often,
   exported to RUNS/shapes-stage4;
6. stage 5, `configs/shapes_zsnr.py`: continued on the zero-terminal-SNR schedule (positions),
   exported to RUNS/shapes-stage5;
7. stage 6, `configs/shapes_vae_decoder.py`: the VAE's decoder fine-tuned, encoder frozen;
8. the EMA weights exported in float16 to RUNS/shapes-model-fp16, ready to copy to
   jaxdiff/assets/shapes-model (the folder `jaxdiff generate` uses without --model).

Each stage resumes from its work directory's last checkpoint when run again. The configs name
/work/runs; this script points them at RUNS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from jaxdiff.cli import ScriptParser

REPO = Path(__file__).resolve().parents[1]
# Stages 2-5: (config, work directory, exported model), each starting from the one before.
UNET_STAGES = (
    ("shapes.py", "shapes-unet", "shapes-stage2"),
    ("shapes_v.py", "shapes-v", "shapes-stage3"),
    ("shapes_late.py", "shapes-late", "shapes-stage4"),
    ("shapes_zsnr.py", "shapes-zsnr", "shapes-stage5"),
)


def jaxdiff(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "jaxdiff", *args], check=True)


def set_scaling_factor(model_dir: Path, data_dir: Path, n: int = 512) -> float:
    """scaling_factor = 1 / std of the VAE's posterior means over `n` dataset images."""
    from jaxdiff.convert import load_pipeline
    from jaxdiff.models.build import module_for
    from jaxdiff.pipelines.images import read_image

    weights = load_pipeline(model_dir)
    vae = module_for(weights.configs["vae"])
    files = sorted(data_dir.glob("*.png"))[:n]
    images = np.stack([read_image(f) for f in files]) * 2.0 - 1.0
    means = [
        np.asarray(
            vae.apply({"params": weights.params["vae"]}, images[i : i + 64], method=vae.encode).mean
        )
        for i in range(0, len(images), 64)
    ]
    factor = float(1.0 / np.concatenate(means).std())
    config_path = model_dir / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["scaling_factor"] = factor
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return factor


def train(config: str, workdir: Path, data: Path, model: Path | None = None) -> None:
    args = ["train", str(REPO / "configs" / config), "--workdir", str(workdir)]
    args += ["--set", f"data_dir={data}", "--no-progress"]
    if model is not None:
        args += ["--set", f"model={model}"]
    jaxdiff(*args)


def main() -> None:
    p = ScriptParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, required=True, help="work folder for data and runs")
    runs = p.parse_args().runs
    data = runs / "shapes-data"
    if not data.exists():
        jaxdiff("make-shapes", str(data), "--n", "20000", "--seed", "0")

    stage1 = runs / "shapes-stage1"
    if not stage1.exists():
        train("shapes_vae.py", runs / "shapes-vae", data)
        jaxdiff("export", str(runs / "shapes-vae"), str(stage1))
        print(f"VAE scaling_factor = {set_scaling_factor(stage1, data):.5f}")
        # Stage 2's UNet starts from `jaxdiff init shapes --seed 0` (the shipped model did).
        fresh = runs / "shapes-init"
        jaxdiff("init", "shapes", str(fresh), "--seed", "0", "--force")
        shutil.rmtree(stage1 / "unet")
        shutil.copytree(fresh / "unet", stage1 / "unet")

    previous = stage1
    for config, workdir, stage in UNET_STAGES:
        out = runs / stage
        if not out.exists():
            train(config, runs / workdir, data, previous)
            jaxdiff("export", str(runs / workdir), str(out))
        previous = out

    train("shapes_vae_decoder.py", runs / "shapes-decoder", data, previous)
    jaxdiff("export", str(runs / "shapes-decoder"), str(runs / "shapes-model"), "--force")
    jaxdiff(
        "convert",
        str(runs / "shapes-model"),
        str(runs / "shapes-model-fp16"),
        "--dtype",
        "float16",
        "--force",
    )
    print(f"done: {runs / 'shapes-model-fp16'}")


if __name__ == "__main__":
    main()
