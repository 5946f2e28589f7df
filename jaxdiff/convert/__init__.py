"""Converting weights between diffusers / transformers files and jaxdiff parameters."""

from jaxdiff.convert.diffusers import (
    PipelineWeights,
    WeightsError,
    load_component,
    load_pipeline,
    params_to_state_dict,
    save_component,
    save_pipeline,
    state_dict_to_params,
)

__all__ = [
    "PipelineWeights",
    "WeightsError",
    "load_component",
    "load_pipeline",
    "params_to_state_dict",
    "save_component",
    "save_pipeline",
    "state_dict_to_params",
]
