"""Write the old-format weight fixtures with the writers of the code base BEFORE the one-weights-stack
refactor (commit ec1deb9), so tests/test_weights_roundtrip.py can check that files written by them
keep loading. Run from a checkout of that commit:

    cd /path/to/checkout-at-ec1deb9 && OMP_NUM_THREADS=1 python /path/to/tests/data/old_format/make_fixtures.py OUT_DIR

Every file is tiny (custom configs of a few thousand parameters; random values, each tensor filled
from a seeded normal so that every tensor differs). The EfficientNet encoder has a fixed ~20M
parameter backbone, so it has no fixture: the test writes a file with the old converter's exact
metadata instead.
"""
import json
import os
import sys
import types

sys.path.insert(0, os.getcwd())  # the old checkout

import numpy as np  # noqa: E402
import paddle  # noqa: E402

STAGE_C = dict(c_in=16, c_out=16, c_r=8, patch_size=1, c_cond=8, c_hidden=[8, 16], nhead=[1, 2],
               blocks=[[1, 1], [1, 1]], block_repeat=[[1, 1], [1, 2]], level_config=["CT", "CTA"], c_clip_text=8,
               c_clip_text_pooled=8, c_clip_img=8, c_clip_seq=2, kernel_size=3, dropout=[0.0, 0.0],
               self_attn=True, t_conds=["sca"], switch_level=[False])
STAGE_B = dict(c_in=4, c_out=4, c_r=8, patch_size=2, c_cond=8, c_hidden=[8, 16], nhead=[-1, 2],
               blocks=[[1, 1], [1, 1]], block_repeat=[[1, 1], [1, 1]], level_config=["CT", "CTA"], c_clip=8,
               c_clip_seq=2, c_effnet=16, c_pixels=3, kernel_size=3, dropout=[0.0, 0.0], self_attn=True,
               t_conds=["sca"])
STAGE_A = dict(levels=2, bottleneck_blocks=1, c_hidden=8, c_latent=4, codebook_size=16, scale_factor=0.5)
PREVIEWER = dict(c_in=16, c_hidden=8, c_out=3)
SD_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[4, 8],
               down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=4, norm_num_groups=2,
               attention_head_dim=2)


def fill(layer, seed):
    """Every tensor from its own seeded normal (variances positive)."""
    rng = np.random.default_rng(seed)
    for name, t in layer.state_dict().items():
        if "float" not in str(t.dtype):
            continue
        v = rng.standard_normal(t.shape).astype(np.float32)
        if name.endswith(("_variance", "running_var")):
            v = np.abs(v) + 0.5
        t.set_value(paddle.to_tensor(v).astype(t.dtype))
    return layer


def main(out):
    os.makedirs(out, exist_ok=True)
    from ldm.cascade.loading import convert_unet_weights
    from ldm.cascade.previewer import Previewer
    from ldm.cascade.stage_a import StageA
    from ldm.cascade.stage_b import StageB
    from ldm.cascade.stage_c import StageC
    from ldm.cascade.train_c import write_stage_c
    from ldm.weights.io import save_safetensors
    from ldm.weights.other_keys import convert_clip_dir, convert_previewer, save_paddle_weights

    c = fill(StageC(**STAGE_C), 1)
    # Stage C training checkpoint (train_c.write_stage_c: trained weights and EMA)
    ckpt = os.path.join(out, "checkpoint-2")
    os.makedirs(ckpt, exist_ok=True)
    write_stage_c(c.state_dict().items(), os.path.join(ckpt, "stage_c.safetensors"), STAGE_C)
    ema = [(k, v * 0.5) for k, v in c.state_dict().items()]
    write_stage_c(ema, os.path.join(ckpt, "stage_c_ema.safetensors"), STAGE_C)
    # Stage C / B converter output (convert_unet_weights; Stage B stored as bf16)
    convert_unet_weights(os.path.join(ckpt, "stage_c.safetensors"), os.path.join(out, "stage_c.safetensors"),
                         stage="c", preset=None, dtype="float32", source_format="paddle")
    b = fill(StageB(**STAGE_B), 2)
    tmp = os.path.join(out, "_b_src.safetensors")
    save_safetensors(b.state_dict(), tmp, metadata={"format": "ldm-cascade-paddle", "stage": "b",
                                                    "config": json.dumps(STAGE_B)})
    convert_unet_weights(tmp, os.path.join(out, "stage_b_bf16.safetensors"), stage="b", preset=None,
                         dtype="bfloat16", source_format="paddle")
    os.remove(tmp)
    # the seed's PaddleMIX .pdparams layout (paddle.save; unsplit in_proj leftovers next to q/k/v)
    state = dict(c.state_dict())
    for k in [k for k in state if k.endswith(".attention.attn.q_proj.weight")]:
        pre = k[: -len("q_proj.weight")]
        state[pre + "in_proj_weight"] = paddle.zeros([3 * state[k].shape[0], state[k].shape[1]])
    paddle.save(state, os.path.join(out, "stage_c_seed.pdparams"))
    # Stage A (save_paddle_weights, "np")
    save_paddle_weights(fill(StageA(**STAGE_A), 3), os.path.join(out, "stage_a.safetensors"), "stage_a")
    # Previewer through the torch converter (convert_previewer, "np" + source)
    p = fill(Previewer(**PREVIEWER), 4)
    torch_names = {k.replace("._mean", ".running_mean").replace("._variance", ".running_var"): v.numpy()
                   for k, v in p.state_dict().items()}
    src = os.path.join(out, "_previewer_torch.safetensors")
    save_safetensors(torch_names, src)
    convert_previewer(src, os.path.join(out, "previewer.safetensors"))
    os.remove(src)
    # CLIP: tiny text folder (clip._save_folder, "np") and a vision folder through convert_clip_dir
    from ldm.cascade.clip import make_tiny_clip_text

    make_tiny_clip_text(os.path.join(out, "clip_text"), projection_dim=8, hidden_size=8, num_hidden_layers=1)
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torch
    import transformers

    torch.manual_seed(5)
    vcfg = transformers.CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=16, patch_size=8, projection_dim=8)
    hf = os.path.join(out, "_hf_vision")
    transformers.CLIPVisionModelWithProjection(vcfg).save_pretrained(hf, safe_serialization=True)
    convert_clip_dir(hf, os.path.join(out, "clip_vision"), "vision")
    import shutil

    shutil.rmtree(hf)
    # SD UNet: ppdiffusers save_pretrained ("pd"), the trainer's EMA writer, the diffusers export ("pt")
    from ppdiffusers import UNet2DConditionModel

    from ldm.sd.export import export_unet_to_diffusers
    from ldm.sd.model import StableDiffusionModel

    unet = fill(UNet2DConditionModel(**SD_UNET), 6)
    unet.save_pretrained(os.path.join(out, "sd_unet"))
    shadow = {k: v * 0.5 for k, v in unet.named_parameters()}
    StableDiffusionModel.save_ema(types.SimpleNamespace(unet=unet), os.path.join(out, "sd_ckpt"), shadow)
    export_unet_to_diffusers(unet, os.path.join(out, "sd_export"))
    sizes = {os.path.relpath(os.path.join(d, f), out): os.path.getsize(os.path.join(d, f))
             for d, _, fs in os.walk(out) for f in fs}
    print(json.dumps(sizes, indent=1), sum(sizes.values()))


if __name__ == "__main__":
    main(sys.argv[1])
