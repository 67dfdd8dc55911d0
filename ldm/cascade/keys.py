"""Key tables of the Stable Cascade networks, registered into ldm.weights under their model names.

Stage B / Stage C ("stage_b", "stage_c"), three layouts:
  "paddle"    - this project (= PaddleMIX's Paddle modules, the seed's .pdparams): Linear weights
                [in, out]; attention as `attention.attn.{q,k,v,out}_proj.{weight,bias}`.
  "original"  - Stability-AI checkpoints (stage_c.safetensors, stage_b_lite.safetensors, ...):
                torch Linear [out, in]; torch nn.MultiheadAttention
                `attention.attn.in_proj_weight` [3c, c] / `in_proj_bias` [3c] / `out_proj.*`.
  "diffusers" - StableCascadeUNet (prior/, decoder/ folders): torch Linear [out, in];
                `attention.to_q/to_k/to_v/to_out.0`; Stage B `clip_mapper` is named
                `clip_txt_pooled_mapper`.
Sources: diffusers scripts/convert_stable_cascade.py (original -> diffusers renames), PaddleMIX
examples/stable_cascade/scripts/convert_unet_weight.py (torch -> paddle transposes and splits).

Stage A, EfficientNet encoder, Previewer ("stage_a", "effnet", "previewer"): regex rule tables
(ldm.weights.keys). Every transform is listed: "transpose" only for real `nn.Linear` weights;
conv, transposed-conv, embedding and norm tensors keep their layout; BatchNorm statistics are
renamed to Paddle's (`ldm.weights.BN_RULES`), `num_batches_tracked` is dropped. Layouts:
"paddle" (ours, or a .pdparams that kept torch's BatchNorm names), "original" (Stability-AI
safetensors) and, for Stage A, "diffusers" (`PaellaVQModel`, codebook `vquantizer.embedding`).
Sources of the names: Stability-AI/StableCascade `modules/stage_a.py`, `effnet.py`,
`previewer.py`, diffusers `PaellaVQModel`, torchvision `efficientnet_v2_s`.

The `*_config_from_shapes` functions infer constructor arguments from the tensor shapes of a file
that carries no config (the seed's .pdparams, original torch files).
"""
from __future__ import annotations

import re
from typing import Mapping

from ldm.weights import BN_RULES, KeyTable, Op, WeightsError, register_key_table, rule_table

__all__ = [
    "LAYOUTS",
    "LINEAR_WEIGHT_RE",
    "TRANSPOSED_WEIGHTS",
    "PADDLEMIX_LEFTOVER_RE",
    "is_linear_weight",
    "detect_layout",
    "detect_stage",
    "plan_to_paddle",
    "plan_from_paddle",
    "STAGE_A_RULES",
    "STAGE_A_DIFFUSERS_RULES",
    "EFFNET_RULES",
    "PREVIEWER_RULES",
    "stage_a_config_from_shapes",
    "previewer_config_from_shapes",
    "effnet_config_from_shapes",
]

# ---------------------------------------------------------------------------------------------
# Stage B / Stage C
# ---------------------------------------------------------------------------------------------
LAYOUTS = ("paddle", "original", "diffusers")

# Linear weights (2-D) of Stage B / C in *our* names: transposed between torch ([out, in]) and
# paddle ([in, out]). Everything else (conv kernels, biases, GRN gamma/beta [1, 1, 1, C]) is copied
# as it is. One regular expression per kind of Linear:
TRANSPOSED_WEIGHTS = (
    r"^clip_txt_mapper\.weight$",  # Stage C conditioning
    r"^clip_txt_pooled_mapper\.weight$",
    r"^clip_img_mapper\.weight$",
    r"^clip_mapper\.weight$",  # Stage B conditioning
    r"\.channelwise\.0\.weight$",  # ResBlock / FeedForwardBlock MLP in
    r"\.channelwise\.4\.weight$",  # ... and out
    r"\.mapper\.weight$",  # TimestepBlock
    r"\.mapper_[A-Za-z0-9]+\.weight$",  # TimestepBlock t_conds: mapper_sca, mapper_crp
    r"\.kv_mapper\.1\.weight$",  # AttnBlock conditioning projection
    r"\.attention\.attn\.[qkv]_proj\.weight$",  # attention (torch: slices of in_proj_weight)
    r"\.attention\.attn\.out_proj\.weight$",
)
LINEAR_WEIGHT_RE = re.compile("|".join(f"(?:{p})" for p in TRANSPOSED_WEIGHTS))

# Keys PaddleMIX's torch->paddle converter left in the seed .pdparams next to q/k/v_proj (it
# stores the unsplit torch in_proj as well); paddle's set_state_dict ignored them. We drop them.
PADDLEMIX_LEFTOVER_RE = re.compile(r"\.attention\.attn\.in_proj_(weight|bias)$")

_QKV = ("q", "k", "v")

# Attention renames, per layout: (our suffix, layout suffix). For "original" q/k/v share one
# stacked tensor (index 0/1/2 along axis 0).
_ATTN_DIFFUSERS = [
    (".attention.attn.q_proj.", ".attention.to_q."),
    (".attention.attn.k_proj.", ".attention.to_k."),
    (".attention.attn.v_proj.", ".attention.to_v."),
    (".attention.attn.out_proj.", ".attention.to_out.0."),
]
# Whole-name renames per (layout, stage): our name -> layout name.
_RENAMES = {
    ("diffusers", "b"): {
        "clip_mapper.weight": "clip_txt_pooled_mapper.weight",
        "clip_mapper.bias": "clip_txt_pooled_mapper.bias",
    },
}


def is_linear_weight(our_name: str) -> bool:
    return LINEAR_WEIGHT_RE.search(our_name) is not None


def detect_layout(names) -> str:
    """Guess the layout from key names (needs at least one attention block)."""
    names = list(names)
    if any(n.endswith(".attention.to_q.weight") for n in names):
        return "diffusers"
    if any(n.endswith(".attention.attn.q_proj.weight") for n in names):
        return "paddle"
    if any(n.endswith(".attention.attn.in_proj_weight") for n in names):
        return "original"
    raise WeightsError("cannot tell the weight layout from the key names (no attention keys found); "
                       "pass the layout explicitly")


def detect_stage(names) -> str:
    names = set(names)
    if "clip_txt_mapper.weight" in names:
        return "c"
    if "effnet_mapper.0.weight" in names:
        return "b"
    raise WeightsError("cannot tell Stage B from Stage C: neither clip_txt_mapper.weight nor "
                       "effnet_mapper.0.weight is present")


def _attn_prefix(name: str, marker: str):
    i = name.find(marker)
    return (name[:i], name[i + len(marker):]) if i >= 0 else (None, None)


def plan_to_paddle(src_shapes: Mapping[str, tuple], layout: str, stage: str) -> dict[str, Op]:
    """Plan for converting a checkpoint in `layout` to our names/shapes (target order = source order)."""
    if layout not in LAYOUTS:
        raise WeightsError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if stage not in ("b", "c"):
        raise WeightsError(f"unknown stage {stage!r}; use 'b' or 'c'")
    plan: dict[str, Op] = {}
    unknown = []
    inv_renames = {v: k for k, v in _RENAMES.get((layout, stage), {}).items()}

    def add(ours, op):
        if ours in plan:
            raise WeightsError(f"two source tensors map to {ours!r}")
        plan[ours] = op

    for name, shape in src_shapes.items():
        shape = tuple(int(s) for s in shape)
        if layout == "paddle":
            if PADDLEMIX_LEFTOVER_RE.search(name):
                continue  # see PADDLEMIX_LEFTOVER_RE
            add(name, Op((name,), "copy", shape))
            continue
        if layout == "original":
            pre, field = _attn_prefix(name, ".attention.attn.in_proj_")
            if pre is not None:
                if field not in ("weight", "bias") or shape[0] % 3:
                    unknown.append(f"{name} {shape}")
                    continue
                n = shape[0] // 3
                for i, q in enumerate(_QKV):
                    ours = f"{pre}.attention.attn.{q}_proj.{field}"
                    if field == "weight":
                        add(ours, Op((name,), "slice_T", (shape[1], n), i))
                    else:
                        add(ours, Op((name,), "slice", (n,), i))
                continue
            ours = name
        else:  # diffusers
            ours = inv_renames.get(name, name)
            for our_sfx, their_sfx in _ATTN_DIFFUSERS:
                if their_sfx in ours:
                    ours = ours.replace(their_sfx, our_sfx)
                    break
        if is_linear_weight(ours):
            if len(shape) != 2:
                unknown.append(f"{name} {shape} (a Linear weight must be 2-D)")
                continue
            add(ours, Op((name,), "T", (shape[1], shape[0])))
        else:
            add(ours, Op((name,), "copy", shape))
    if unknown:
        raise WeightsError("source tensors that cannot be mapped:\n  " + "\n  ".join(unknown))
    return plan


def plan_from_paddle(our_shapes: Mapping[str, tuple], layout: str, stage: str) -> dict[str, Op]:
    """Plan for exporting our weights to `layout` (torch names and shapes)."""
    if layout not in LAYOUTS:
        raise WeightsError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    renames = _RENAMES.get((layout, stage), {})
    plan: dict[str, Op] = {}
    for ours, shape in our_shapes.items():
        shape = tuple(int(s) for s in shape)
        if layout == "paddle":
            plan[ours] = Op((ours,), "copy", shape)
            continue
        if layout == "original":
            pre, field = _attn_prefix(ours, ".attention.attn.q_proj.")
            if pre is not None:
                srcs = tuple(f"{pre}.attention.attn.{q}_proj.{field}" for q in _QKV)
                if field == "weight":
                    plan[f"{pre}.attention.attn.in_proj_weight"] = Op(srcs, "T_cat", (3 * shape[1], shape[0]))
                else:
                    plan[f"{pre}.attention.attn.in_proj_bias"] = Op(srcs, "cat", (3 * shape[0],))
                continue
            if ".attention.attn.k_proj." in ours or ".attention.attn.v_proj." in ours:
                continue  # folded into in_proj above
            theirs = ours
        else:
            theirs = renames.get(ours, ours)
            for our_sfx, their_sfx in _ATTN_DIFFUSERS:
                if our_sfx in theirs:
                    theirs = theirs.replace(our_sfx, their_sfx)
                    break
        if is_linear_weight(ours):
            plan[theirs] = Op((ours,), "T", (shape[1], shape[0]))
        else:
            plan[theirs] = Op((ours,), "copy", shape)
    return plan


# ---------------------------------------------------------------------------------------------
# Stage A, EfficientNet encoder, Previewer
# ---------------------------------------------------------------------------------------------
# Stage A: the only Linear layers are the ResBlock channel MLPs.
STAGE_A_RULES = [(r"\.channelwise\.[02]\.weight$", None, "transpose")] + BN_RULES
STAGE_A_DIFFUSERS_RULES = [(r"^vquantizer\.embedding\.weight$", "vquantizer.codebook.weight", None)] + STAGE_A_RULES
# EfficientNet encoder and Previewer: convolutions and BatchNorms only (the SE `fc1`/`fc2` are 1x1
# convolutions, not Linear layers: no transpose).
EFFNET_RULES = list(BN_RULES)
PREVIEWER_RULES = list(BN_RULES)


def stage_a_config_from_shapes(shapes: Mapping[str, tuple]) -> dict:
    """Infer `StageA` arguments (all but scale_factor) from a {name: shape} dict in our names."""
    try:
        if "vquantizer.codebook.weight" in shapes:
            k, c_latent = shapes["vquantizer.codebook.weight"]
        else:  # a decode-only file (see ldm.cascade.loading.load_stage_a)
            k, c_latent = 8192, shapes["up_blocks.0.0.weight"][1]
        down_res = sorted(int(m.group(1)) for n in shapes if (m := re.match(r"down_blocks\.(\d+)\.gammas$", n)))
        up_res = [n for n in shapes if re.match(r"up_blocks\.\d+\.gammas$", n)]
        levels = len(down_res)
        c_hidden = shapes[f"down_blocks.{down_res[-1]}.depthwise.1.weight"][0]
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"not a Stage A state dict (cannot infer its sizes: {e!r})") from e
    return dict(levels=levels, bottleneck_blocks=len(up_res) - (levels - 1), c_hidden=int(c_hidden),
                c_latent=int(c_latent), codebook_size=int(k))


def previewer_config_from_shapes(shapes: Mapping[str, tuple]) -> dict:
    try:
        c_hidden, c_in = shapes["blocks.0.weight"][:2]
        c_out = shapes["blocks.24.weight"][0]
    except KeyError as e:
        raise ValueError(f"not a Previewer state dict (missing {e})") from e
    return dict(c_in=int(c_in), c_hidden=int(c_hidden), c_out=int(c_out))


def effnet_config_from_shapes(shapes: Mapping[str, tuple]) -> dict | None:
    """The latent width from the mapper conv (the backbone is fixed); None when the mapper is
    absent (then the default config is built and the key check lists what is missing)."""
    if "mapper.0.weight" not in shapes:
        return None
    return dict(c_latent=int(shapes["mapper.0.weight"][0]))


# ---------------------------------------------------------------------------------------------
# Registration (model names = the "model" of ldm.weights.metadata)
# ---------------------------------------------------------------------------------------------
for _stage in ("c", "b"):
    register_key_table(KeyTable(
        f"stage_{_stage}", LAYOUTS,
        to_paddle=lambda shapes, layout, s=_stage: plan_to_paddle(shapes, layout, s),
        from_paddle=lambda shapes, layout, s=_stage: plan_from_paddle(shapes, layout, s),
        detect_layout=detect_layout))
register_key_table(rule_table("stage_a", {"paddle": BN_RULES, "original": STAGE_A_RULES,
                                          "diffusers": STAGE_A_DIFFUSERS_RULES}))
register_key_table(rule_table("effnet", {"paddle": BN_RULES, "original": EFFNET_RULES}))
register_key_table(rule_table("previewer", {"paddle": BN_RULES, "original": PREVIEWER_RULES}))
