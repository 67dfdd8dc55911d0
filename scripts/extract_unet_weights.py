"""Extract the fine-tuned Stage C or Stage B weights from a `train_stage_c_trainer.py` / `scripts/train_stage_b_trainer.py` output.

    python scripts/extract_unet_weights.py --checkpoint ./train_output/checkpoint-1000 --output stage_c_ft.safetensors
    python scripts/extract_unet_weights.py --checkpoint ./train_output --ema --output stage_c_ema.safetensors

--checkpoint is a checkpoint-N folder, or an output folder (its final weights, else its newest
complete checkpoint). The output is this project's Stage C safetensors (network config in the
metadata): `ldm.cascade.loading.load_stage_c(path, preset=None)` loads it, and inference.py uses it
when it is placed in the weights folder under the Stage C name of config.py (stage_c_lite.safetensors
for the 1B model; .safetensors is preferred over the seed's .pdparams) or passed as `--stage_c FILE`.
A Stage B run (stage_b.safetensors) gives a Stage B file for `inference.py --stage_b FILE`; --stage
picks one when a folder holds both (default: whichever it holds). A LoRA run's adapters are already
a file of their own: <output_dir>/stage_c_lora.safetensors (inference.py --lora) or stage_b_lora (--lora_b).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


from ldm.utils import quiet_third_party, run_main

if __name__ == "__main__":
    quiet_third_party()  # before paddle is imported (issue 12 item 15)

from ldm.cascade.convert import convert_unet_weights  # noqa: E402
from ldm.train.stage_b import STAGE_B_EMA_FILE, STAGE_B_FILE  # noqa: E402
from ldm.train.stage_c import STAGE_C_EMA_FILE, STAGE_C_FILE  # noqa: E402
from ldm.weights import STORAGE_DTYPES  # noqa: E402
from ldm.train.checkpoint import COMPLETE_MARKER, find_resume_checkpoint, is_complete, list_checkpoints  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint-N folder or the training --output_dir")
    p.add_argument("--output", required=True, help="output .safetensors (written atomically)")
    p.add_argument("--ema", action="store_true", help="extract the EMA weights (training with --use_ema)")
    p.add_argument("--stage", choices=["auto", "c", "b"], default="auto",
                   help="which network: auto (the one the folder holds), c or b")
    p.add_argument("--dtype", choices=list(STORAGE_DTYPES), default="float32", help="storage dtype of the output")
    p.add_argument("--allow_incomplete", action="store_true",
                   help=f"accept a checkpoint without {COMPLETE_MARKER} (a save that was interrupted)")
    return p.parse_args(argv)


FILES = {"c": (STAGE_C_FILE, STAGE_C_EMA_FILE), "b": (STAGE_B_FILE, STAGE_B_EMA_FILE)}


def weights_stage(folder: str, stage: str = "auto") -> str:
    """"c" or "b": the stage whose weights `folder` (or its newest complete checkpoint) holds."""
    if stage != "auto":
        return stage
    places = [folder] + ([find_resume_checkpoint(folder)] if os.path.isdir(folder) else [])
    found = [s for s, (name, _) in FILES.items() if any(p and os.path.isfile(os.path.join(p, name)) for p in places)]
    if len(found) > 1:
        raise ValueError(f"{folder} holds Stage C and Stage B weights: pass --stage c or --stage b")
    return found[0] if found else "c"


def find_weights(folder: str, ema: bool, allow_incomplete: bool = False, stage: str = "c") -> str:
    """The Stage C / B (or EMA) file of a checkpoint or output folder; errors name what is missing."""
    name = FILES[stage][1 if ema else 0]
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--checkpoint {folder} is not a folder")
    if os.path.isfile(os.path.join(folder, name)):
        if list_checkpoints(os.path.dirname(os.path.abspath(folder))) and os.path.basename(
                os.path.normpath(folder)).startswith("checkpoint-") and not is_complete(folder) and not allow_incomplete:
            raise ValueError(f"{folder} is incomplete (no {COMPLETE_MARKER}: its save was interrupted); use an "
                             f"earlier checkpoint or --allow_incomplete")
        return os.path.join(folder, name)
    newest = find_resume_checkpoint(folder)
    if newest and os.path.isfile(os.path.join(newest, name)):
        return os.path.join(newest, name)
    hint = " (was the run trained with --use_ema?)" if ema else ""
    lora = os.path.join(folder, f"stage_{stage}_lora{'_ema' if ema else ''}.safetensors")
    if os.path.isfile(lora):  # a --lora_rank run saves adapters only
        hint = (f" (a LoRA run: its adapters are {lora}, for inference.py --lora{'_b' if stage == 'b' else ''}; "
                f"scripts/merge_lora.py merges them into a base file)")
    raise FileNotFoundError(f"no {name} in {folder} or in a complete checkpoint-N inside it{hint}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    stage = weights_stage(args.checkpoint, args.stage)
    src = find_weights(args.checkpoint, args.ema, args.allow_incomplete, stage)
    summary = convert_unet_weights(src, args.output, stage=stage, preset=None, dtype=args.dtype, source_format="paddle")
    summary["input"] = src
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(run_main(main))
