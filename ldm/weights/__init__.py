"""Weight IO (safetensors, safe .pdparams) and key maps from the reference layouts."""
from .io import (
    SafetensorsReader,
    SafetensorsWriter,
    WeightsError,
    assign_state_dict,
    check_state_dict,
    iter_state_dict,
    load_pdparams,
    load_state_dict,
    read_safetensors,
    save_safetensors,
)

__all__ = ["SafetensorsReader", "SafetensorsWriter", "WeightsError", "assign_state_dict", "check_state_dict",
           "iter_state_dict", "load_pdparams", "load_state_dict", "read_safetensors", "save_safetensors"]
