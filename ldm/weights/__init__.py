"""One weights stack: one reader, one strict assigner, one atomic writer, one metadata schema, one
dtype table, the restricted unpickler and the key-table registry. A leaf: it imports only numpy,
paddle, the standard library and ldm.utils, and knows no network.

    reader    WeightSource(paths)           safetensors files and shards, *.index.json, model
                                            folders (diffusers / transformers), .pdparams through
                                            the restricted unpickler; names, shapes and dtype tags
                                            from the headers, one tensor at a time. Every header
                                            is validated (ldm.weights.files).
              load_state_dict / iter_state_dict(path)   the same, as a dict / a stream
    assigner  assign_state_dict(layer, weights, plan=...)   names, shapes and dtype kinds checked
                                            first, every mismatch listed in one WeightsError
              finish_loading(model, weights, dtype=...)     + cast, eval, frozen
    writer    save_safetensors(state, path, dtype, metadata, plan=..., expected=...)   streaming,
                                            atomic (temporary file, fsync, rename)
    schema    weights_metadata(model, config)   {"format": "np", "model": ..., "config": json}
              read_info(metadata)           also every tag written before: "ldm-cascade-paddle"
                                            (+ "stage"), "np", "pd", "pt"; see ldm.weights.metadata
    dtypes    STORAGE_DTYPES, check_storage_dtype, the safetensors tag table, bf16 helpers
    keys      Op / apply_op (conversion plans), rule tables (map_key, rules_plan, BN_RULES),
              KeyTable + register_key_table / key_table: the model side (ldm/cascade/keys.py,
              ldm/clip.py) registers its tables under the model names of the metadata

Adding a model: write its key table next to the network, `register_key_table(...)` it under a
model name, and save with `save_safetensors(net.state_dict(), path, metadata=weights_metadata(name,
net.config))`; the loader reads `WeightSource(path).info.config` to rebuild the network.
"""
from .assign import assign_state_dict, check_state_dict, finish_loading
from .dtypes import (
    FLOAT_TAGS,
    ST_DTYPES,
    STORAGE_DTYPES,
    STORAGE_TAGS,
    WeightsError,
    bf16_to_fp32,
    check_storage_dtype,
    fp32_to_bf16,
)
from .files import SafetensorsReader, SafetensorsWriter, check_regular_file
from .keys import (
    BN_RULES,
    DROP_PATTERNS,
    KeyTable,
    Op,
    apply_op,
    identity_plan,
    key_table,
    map_key,
    register_key_table,
    registered_models,
    rule_table,
    rules_plan,
)
from .metadata import FORMAT, TORCH_FORMAT, WeightsInfo, read_info, weights_metadata
from .pdparams import TRAINER_STATE_GLOBALS, load_pdparams, load_pickle_restricted
from .source import StateSource, WeightSource, iter_state_dict, load_state_dict, opened, read_json
from .write import save_safetensors

__all__ = [
    "WeightsError", "STORAGE_DTYPES", "STORAGE_TAGS", "ST_DTYPES", "FLOAT_TAGS", "check_storage_dtype",
    "bf16_to_fp32", "fp32_to_bf16",
    "FORMAT", "TORCH_FORMAT", "WeightsInfo", "weights_metadata", "read_info",
    "SafetensorsReader", "SafetensorsWriter", "check_regular_file", "WeightSource", "StateSource", "opened", "load_state_dict",
    "iter_state_dict", "read_json", "load_pdparams", "load_pickle_restricted", "TRAINER_STATE_GLOBALS",
    "check_state_dict", "assign_state_dict", "finish_loading", "save_safetensors",
    "Op", "apply_op", "identity_plan", "DROP_PATTERNS", "BN_RULES", "map_key", "rules_plan", "KeyTable",
    "rule_table", "register_key_table", "key_table", "registered_models",
]
