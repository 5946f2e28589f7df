"""diffusers-format folders <-> jaxdiff parameters.

A diffusers pipeline folder holds `model_index.json` and one subfolder per component (`unet/`,
`vae/`, `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`, `scheduler/`), each with
its `config.json` and weights as safetensors: one file, an `fp16` variant, or shards listed in an
index JSON. jaxdiff's parameter names mirror the PyTorch ones, so converting is mechanical:

    flax path  down_blocks_0 / attentions_1 / proj_in / kernel
    torch key  down_blocks.0.attentions.1.proj_in.weight      (kernel transposed)

Pickled checkpoints (`.bin`, `.ckpt`, `.pt`) are refused: unpickling can run arbitrary code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from jaxdiff import atomic
from jaxdiff.models import config_io
from jaxdiff.models.build import abstract_params
from jaxdiff.models.clip_text import CLIPTextConfig, CLIPTextModel
from jaxdiff.models.unet import UNet2DConditionModel, UNetConfig
from jaxdiff.models.vae import AutoencoderKL, VAEConfig
from jaxdiff.threads import parallel_map
from jaxdiff.tokenizer import ClipTokenizer, load_clip_tokenizer


class WeightsError(ValueError):
    """A model folder or weights file that cannot be loaded; the message names the file and key."""


# ----------------------------------------------------------------------------- naming

# Containers whose children PyTorch numbers (`resnets.0`); Flax names them `resnets_0`.
_NUMBERED = "down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|transformer_blocks|layers|to_out|net"
_NUMBERED_RE = re.compile(rf"^({_NUMBERED})_(\d+)$")
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_key(path: tuple[str, ...]) -> str:
    """The PyTorch state-dict key of a flax parameter path."""
    *modules, leaf = path
    parts = [_NUMBERED_RE.sub(r"\1.\2", m) for m in modules]
    return ".".join(parts + [_LEAF[leaf]])


def to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """Flax layout -> PyTorch layout: conv kernels HWIO -> OIHW, linear kernels IO -> OI."""
    if path[-1] == "kernel":
        if value.ndim == 4:
            return np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
        if value.ndim == 2:
            return np.ascontiguousarray(value.T)
    return value


def from_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        if value.ndim == 4:
            return np.transpose(value, (2, 3, 1, 0))
        if value.ndim == 2:
            return value.T
    return value


# ----------------------------------------------------------------------------- components


@dataclasses.dataclass(frozen=True)
class ComponentKind:
    class_name: str  # the reference library's class
    library: str  # "diffusers" or "transformers"
    weights_name: str  # file stem of its safetensors
    config_cls: type
    module_cls: type


_UNET = ComponentKind(
    "UNet2DConditionModel", "diffusers", "diffusion_pytorch_model", UNetConfig, UNet2DConditionModel
)
_VAE = ComponentKind(
    "AutoencoderKL", "diffusers", "diffusion_pytorch_model", VAEConfig, AutoencoderKL
)
_CLIP = ComponentKind("CLIPTextModel", "transformers", "model", CLIPTextConfig, CLIPTextModel)
_CLIP_PROJ = ComponentKind(
    "CLIPTextModelWithProjection", "transformers", "model", CLIPTextConfig, CLIPTextModel
)
KINDS = {k.class_name: k for k in (_UNET, _VAE, _CLIP, _CLIP_PROJ)}

# Components jaxdiff computes with; others in a model_index.json (safety checker, feature
# extractor, image encoder) are not loaded.
MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# Buffers that older transformers versions saved with the weights; they are not parameters.
_IGNORED_KEYS = re.compile(r"(^|\.)position_ids$")


def parse_config(kind: ComponentKind, raw: dict, where: str):
    try:
        if kind.library == "transformers":
            return kind.config_cls.from_transformers(raw)
        return kind.config_cls.from_diffusers(raw)
    except config_io.ConfigError as e:
        raise WeightsError(f"{where}: {e}") from None


def config_to_dict(config) -> dict:
    if isinstance(config, CLIPTextConfig):
        import transformers

        return {**config.to_transformers(), "transformers_version": transformers.__version__}
    import jaxdiff

    d = config.to_diffusers()
    d["_jaxdiff_version"] = jaxdiff.__version__
    return d


# ----------------------------------------------------------------------------- reading


def _find_weight_files(folder: Path, stem: str, variant: str | None) -> list[Path]:
    """The safetensors files of a component, preferring the requested variant."""
    variants = [variant] if variant else [None, "fp16"]
    for v in variants:
        single = folder / (f"{stem}.{v}.safetensors" if v else f"{stem}.safetensors")
        index = folder / (
            f"{stem}.safetensors.index.{v}.json" if v else f"{stem}.safetensors.index.json"
        )
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise WeightsError(f"{index}: not a safetensors index ({e})") from None
            files = sorted({folder / name for name in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise WeightsError(f"{index}: lists {f.name}, which is missing")
            return files
        if single.is_file():
            return [single]
    pickles = sorted(p for p in folder.glob("*") if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(pickle_refusal(pickles[0]))
    wanted = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    raise WeightsError(f"{folder}: no {wanted} (nor a sharded index of it)")


def pickle_refusal(path) -> str:
    return (
        f"{path}: is a PyTorch pickle; jaxdiff never unpickles (it can run arbitrary code). "
        "Convert the folder to safetensors once with PyTorch: "
        'python -c "from diffusers import DiffusionPipeline as P; '
        "P.from_pretrained('IN').save_pretrained('OUT', safe_serialization=True)\""
    )


class _SafetensorsFiles(Mapping):
    """The tensors of one component's safetensors files (a model, or its shards), each read from
    its file when looked up: converting a model then holds one tensor of the files at a time, not
    the files' whole contents beside the parameters made from them."""

    def __init__(self, paths):
        from safetensors import safe_open

        self._files, self._bf16_files, self._where = {}, {}, {}
        for path in paths:
            with _reading(path):
                handle = safe_open(str(path), framework="np")
                keys = list(handle.keys())
            self._files[path] = handle
            self._where.update(dict.fromkeys(keys, path))

    def __getitem__(self, key: str) -> np.ndarray:
        from safetensors import safe_open

        path = self._where[key]
        with _reading(path):
            handle = self._files[path]
            if handle.get_slice(key).get_dtype() != "BF16":
                return handle.get_tensor(key)
            # numpy has no bfloat16 of its own; the flax reader returns ml_dtypes arrays.
            if path not in self._bf16_files:
                self._bf16_files[path] = safe_open(str(path), framework="flax")
            return np.asarray(self._bf16_files[path].get_tensor(key))

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def origin(self) -> dict[str, Path]:
        """Each tensor's file, for error messages."""
        return dict(self._where)

    def close(self) -> None:
        """Unmap the files."""
        for handle in (*self._files.values(), *self._bf16_files.values()):
            handle.__exit__(None, None, None)
        self._files, self._bf16_files = {}, {}


@contextlib.contextmanager
def _reading(path):
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: unreadable safetensors file ({e}); is it truncated?") from None


# XLA's CPU backend computes on a host array in place (jax.device_put copies nothing) when its
# data starts on a 64-byte boundary; otherwise it copies it.
_HOST_ALIGNMENT = 64
# Transposed copies go tile by tile (both arrays' tiles stay in cache), on the thread pool: tiles
# of 256x256 elements of the last two axes, 128x128 where a tile spans leading axes too (a conv
# kernel's 3x3 taps).
_TILE = 256


def host_array(value, dtype) -> np.ndarray:
    """`value` as a C-contiguous `dtype` array whose data starts on a 64-byte boundary (a copy,
    unless it is one already). On the CPU, parameters made this way are used in place by the
    devices they are put on, so a loaded model is in memory once rather than twice.

    A transposed view (PyTorch's kernel layouts) is copied in tiles, on `jaxdiff.threads`' pool:
    2-3x faster than numpy's one pass over a transposed kernel (docs/benchmarks.md)."""
    dtype = np.dtype(dtype)
    value = np.asarray(value)
    if (
        value.dtype == dtype
        and value.flags.c_contiguous
        and value.ctypes.data % _HOST_ALIGNMENT == 0
    ):
        return value
    nbytes = value.size * dtype.itemsize
    raw = np.empty(nbytes + _HOST_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _HOST_ALIGNMENT
    out = raw[start : start + nbytes].view(dtype).reshape(value.shape)
    if value.ndim < 2 or value.flags.c_contiguous or value.size < _TILE * _TILE:
        out[...] = value
        return out
    rows, cols = value.shape[-2:]
    tile = _TILE if value.ndim == 2 else _TILE // 2

    def copy_slab(i):
        for j in range(0, cols, tile):
            out[..., i : i + tile, j : j + tile] = value[..., i : i + tile, j : j + tile]

    parallel_map(copy_slab, range(0, rows, tile))
    return out


def load_component(
    folder, kind: ComponentKind | str | None = None, *, variant=None, param_dtype=np.float32
):
    """Load one model component folder: returns (config, params), params as numpy arrays."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{folder}: no config.json")
    try:
        raw = json.loads(config_path.read_text())
    except ValueError as e:
        raise WeightsError(f"{config_path}: not valid JSON ({e})") from None
    if kind is None:
        name = raw.get("_class_name") or (raw.get("architectures") or [None])[0]
        if name not in KINDS:
            raise WeightsError(f"{config_path}: unsupported model class {name!r}")
        kind = KINDS[name]
    elif isinstance(kind, str):
        kind = KINDS[kind]
    config = _fix_projection(parse_config(kind, raw, str(config_path)), kind)

    files = _find_weight_files(folder, kind.weights_name, variant)
    with contextlib.closing(_SafetensorsFiles(files)) as tensors:
        params = state_dict_to_params(
            tensors, config, origin=tensors.origin(), param_dtype=param_dtype, where=folder
        )
    return config, params


def state_dict_to_params(tensors, config, *, origin=None, param_dtype=np.float32, where=""):
    """A PyTorch-layout state dict (any mapping of keys to arrays, read once each) -> a Flax
    params tree of `host_array`s; checks keys and shapes exactly."""
    origin = origin or {}
    abstract = traverse_util.flatten_dict(abstract_params(config))
    # The key each parameter is looked up by -> the key in `tensors`.
    source = {k: k for k in tensors if not _IGNORED_KEYS.search(k)}
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix that 4.x used.
    if isinstance(config, CLIPTextConfig) and not config.with_projection:
        if source and not any(k.startswith("text_model.") for k in source):
            source = {"text_model." + k: k for k in source}

    def src(key):
        return origin.get(source.get(key, key), where)

    flat, missing = {}, []
    for path, leaf in abstract.items():
        key = torch_key(path)
        if key not in source:
            missing.append(key)
            continue
        tensor = tensors[source[key]]
        value = from_torch_layout(path, tensor)
        if tuple(value.shape) != tuple(leaf.shape):
            expected = to_torch_layout(path, np.zeros(leaf.shape, np.int8)).shape
            raise WeightsError(
                f"{src(key)}: {key} has shape {tuple(tensor.shape)}, "
                f"the config needs {tuple(expected)}"
            )
        flat[path] = host_array(value, param_dtype)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise WeightsError(f"{where}: missing key {', '.join(missing[:3])}{more}")
    expected_keys = {torch_key(p) for p in abstract}
    unexpected = sorted(k for k in source if k not in expected_keys)
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise WeightsError(
            f"{src(unexpected[0])}: unexpected key {', '.join(unexpected[:3])}{more} "
            "(does config.json match the weights?)"
        )
    return traverse_util.unflatten_dict(flat)


def params_to_state_dict(params) -> dict[str, np.ndarray]:
    """A Flax params tree -> PyTorch-layout state dict (numpy)."""
    from flax import linen as nn

    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    return {torch_key(p): to_torch_layout(p, np.asarray(v)) for p, v in flat.items()}


# ----------------------------------------------------------------------------- pipelines


@dataclasses.dataclass
class PipelineWeights:
    """Everything of a diffusers pipeline folder that jaxdiff computes with."""

    model_index: dict
    configs: dict[str, Any]  # component name -> UNetConfig / VAEConfig / CLIPTextConfig
    params: dict[str, Any]  # component name -> params tree (numpy arrays)
    scheduler_config: dict
    tokenizers: dict[str, Any]  # "tokenizer", "tokenizer_2" -> transformers CLIPTokenizer
    path: Path | None = None

    @property
    def family(self) -> str:
        """'sdxl' for pipelines with SDXL's size conditioning, else 'sd'."""
        return "sdxl" if self.configs["unet"].addition_embed_type == "text_time" else "sd"


def _check_pipeline_folder(path: Path) -> dict:
    if path.is_file():
        if path.suffix in _PICKLE_SUFFIXES:
            raise WeightsError(pickle_refusal(path))
        raise WeightsError(f"{path}: is a file; jaxdiff loads diffusers-format model folders")
    if not path.is_dir():
        raise WeightsError(f"{path}: no such folder")
    index = path / "model_index.json"
    if not index.is_file():
        raise WeightsError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    try:
        model_index = json.loads(index.read_text())
    except ValueError as e:
        raise WeightsError(f"{index}: not valid JSON ({e})") from None
    if not isinstance(model_index, dict) or "unet" not in model_index:
        raise WeightsError(f"{index}: names no unet; not a Stable Diffusion pipeline")
    return model_index


def _component_entries(path: Path, model_index: dict):
    """(name, ComponentKind) of each model component that model_index.json names."""
    for name in MODEL_COMPONENTS:
        entry = model_index.get(name)
        if not entry or entry[0] is None or entry[1] is None:
            continue
        class_name = entry[1]
        if class_name not in KINDS:
            raise WeightsError(
                f"{path / 'model_index.json'}: {name} is an unsupported {class_name}"
            )
        if not (path / name).is_dir():
            raise WeightsError(
                f"{path}: model_index.json names {name}, but {path / name} is missing"
            )
        yield name, KINDS[class_name]


def read_pipeline_configs(path) -> dict[str, Any]:
    """The component configs of a diffusers folder, without reading any weights."""
    path = Path(path)
    model_index = _check_pipeline_folder(path)
    configs = {}
    for name, kind in _component_entries(path, model_index):
        config_path = path / name / "config.json"
        try:
            raw = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise WeightsError(f"{config_path}: unreadable ({e})") from None
        configs[name] = _fix_projection(parse_config(kind, raw, str(config_path)), kind)
    return configs


def _fix_projection(config, kind: ComponentKind):
    """model_index.json's class decides whether a CLIP text encoder has its projection."""
    if isinstance(config, CLIPTextConfig):
        with_projection = kind.class_name == "CLIPTextModelWithProjection"
        if config.with_projection != with_projection:
            config = dataclasses.replace(config, with_projection=with_projection)
    return config


def random_pipeline(preset: str, seed: int = 0) -> PipelineWeights:
    """A preset with random weights and the bundled CLIP tokenizer (for tests and benchmarks)."""
    from jaxdiff.models.build import random_params
    from jaxdiff.models.presets import get_preset
    from jaxdiff.tokenizer import bundled_clip_tokenizer

    p = get_preset(preset)
    configs = p.components()
    params = {name: random_params(cfg, seed + i) for i, (name, cfg) in enumerate(configs.items())}
    tokenizers = {}
    if p.text_encoder is not None:
        tokenizers["tokenizer"] = bundled_clip_tokenizer()
    if p.text_encoder_2 is not None:
        tokenizers["tokenizer_2"] = bundled_clip_tokenizer()
    return PipelineWeights(p.model_index(), configs, params, dict(p.scheduler), tokenizers)


def load_pipeline(path, *, variant=None, param_dtype=np.float32) -> PipelineWeights:
    """Load a diffusers-format Stable Diffusion folder (SD 1.x, 2.x, SDXL base or refiner)."""
    path = Path(path)
    model_index = _check_pipeline_folder(path)
    configs, params = {}, {}
    for name in MODEL_COMPONENTS:
        entry = model_index.get(name)
        if not entry or entry[0] is None or entry[1] is None:
            continue
        library, class_name = entry
        if class_name not in KINDS:
            raise WeightsError(
                f"{path / 'model_index.json'}: {name} is an unsupported {class_name}"
            )
        sub = path / name
        if not sub.is_dir():
            raise WeightsError(f"{path}: model_index.json names {name}, but {sub} is missing")
        configs[name], params[name] = load_component(
            sub, KINDS[class_name], variant=variant, param_dtype=param_dtype
        )
    for required in ("unet", "vae"):
        if required not in configs:
            raise WeightsError(f"{path}: no {required} in model_index.json")
    scheduler_config = {}
    sched = path / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        try:
            scheduler_config = json.loads(sched.read_text())
        except ValueError as e:
            raise WeightsError(f"{sched}: not valid JSON ({e})") from None
    tokenizers = {}
    for name in ("tokenizer", "tokenizer_2"):
        entry = model_index.get(name)
        if entry and entry[0] is not None and (path / name).is_dir():
            tokenizers[name] = load_tokenizer(path / name)
    return PipelineWeights(model_index, configs, params, scheduler_config, tokenizers, path)


def load_tokenizer(folder):
    try:
        return load_clip_tokenizer(folder)
    except Exception as e:  # transformers raises several types for a bad folder
        raise WeightsError(f"{folder}: cannot load the CLIP tokenizer ({e})") from None


def save_component(folder, config, params, *, dtype=None, variant=None):
    """Write config.json and the safetensors file that diffusers / transformers load."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    is_clip = isinstance(config, CLIPTextConfig)
    state = params_to_state_dict(params)
    for k, v in state.items():
        if dtype is not None:
            v = v.astype(dtype)
        elif v.dtype not in (np.float32, np.float16):  # bfloat16: safetensors.numpy lacks it
            v = v.astype(np.float32)
        state[k] = np.ascontiguousarray(v)
    stem = "model" if is_clip else "diffusion_pytorch_model"
    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    save_file(state, str(folder / name), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n")


def save_pipeline(weights: PipelineWeights, out, *, overwrite: bool = False, dtype=None):
    """Write a diffusers-format folder. It is written next to `out` and moved into place at the
    end, so an existing folder is never left half-overwritten."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise WeightsError(f"{out}: already exists (pass overwrite=True / --force to replace it)")
    with atomic.new_folder(out) as tmp:
        index = {"_class_name": weights.model_index.get("_class_name", "StableDiffusionPipeline")}
        index["_diffusers_version"] = weights.model_index.get("_diffusers_version", "0.30.0")
        for key, value in weights.model_index.items():
            if not key.startswith("_") and not isinstance(value, list):
                index[key] = value  # pipeline options such as force_zeros_for_empty_prompt
        for name, config in weights.configs.items():
            save_component(tmp / name, config, weights.params[name], dtype=dtype)
            kind = _kind_of(config)
            index[name] = [kind.library, kind.class_name]
        for name, tok in weights.tokenizers.items():
            source = Path(str(getattr(tok, "name_or_path", "")))
            if source.is_dir() and (
                isinstance(tok, ClipTokenizer) or (source / "tokenizer_config.json").is_file()
            ):
                shutil.copytree(source, tmp / name)  # the original files, byte for byte
            else:
                tok.save_pretrained(str(tmp / name))
            index[name] = ["transformers", "CLIPTokenizer"]
        if weights.scheduler_config:
            (tmp / "scheduler").mkdir()
            (tmp / "scheduler" / "scheduler_config.json").write_text(
                json.dumps(weights.scheduler_config, indent=2) + "\n"
            )
            index["scheduler"] = [
                "diffusers",
                weights.scheduler_config.get("_class_name", "PNDMScheduler"),
            ]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def _kind_of(config) -> ComponentKind:
    if isinstance(config, UNetConfig):
        return _UNET
    if isinstance(config, VAEConfig):
        return _VAE
    return _CLIP_PROJ if config.with_projection else _CLIP
