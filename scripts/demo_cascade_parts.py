"""The demo's Stable Cascade parts that users normally download (issue 14), written into a weights
folder as the loaders read it (ldm/demo/cascade.py says how each is made):

    python scripts/demo_cascade_parts.py --output_dir assets/demo/cascade [--part all|clip|stage_a|encoder]

clip: clip_text/ (random frozen CLIP text + word tokenizer); stage_a: stage_a.safetensors;
encoder: effnet_encoder.safetensors + previewer.safetensors. Stage B and Stage C are trained
afterwards by the project's trainers (scripts/train_demo.sh). Deterministic for a --seed.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as scripts/evaluate.py

from ldm.utils import quiet_third_party, run_main  # noqa: E402

if __name__ == "__main__":
    quiet_third_party()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="train / write the demo's Stage A, EfficientNet, Previewer, CLIP text")
    p.add_argument("--output_dir", required=True, help="weights folder (e.g. assets/demo/cascade)")
    p.add_argument("--part", choices=["all", "clip", "stage_a", "encoder"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage_a_steps", type=int, default=600)
    p.add_argument("--stage_a_batch_size", type=int, default=8)
    p.add_argument("--stage_a_learning_rate", type=float, default=2e-3)
    p.add_argument("--encoder_steps", type=int, default=3600)
    p.add_argument("--encoder_batch_size", type=int, default=8)
    p.add_argument("--encoder_learning_rate", type=float, default=3e-3)
    args = p.parse_args(argv)
    if min(args.stage_a_steps, args.stage_a_batch_size, args.encoder_steps, args.encoder_batch_size) < 1:
        p.error("steps and batch sizes must be >= 1")
    return args


def main(argv=None):
    from ldm.cascade.loading import save_network
    from ldm.demo import cascade as demo

    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    written = []
    if args.part in ("all", "clip"):
        written.append(demo.write_clip_text(os.path.join(args.output_dir, "clip_text"), seed=args.seed))
    if args.part in ("all", "stage_a"):
        t = time.process_time()
        net, losses = demo.train_stage_a(args.stage_a_steps, args.stage_a_batch_size,
                                         learning_rate=args.stage_a_learning_rate, seed=args.seed)
        save_network(net, os.path.join(args.output_dir, "stage_a.safetensors"))
        written.append(os.path.join(args.output_dir, "stage_a.safetensors"))
        print(f"stage A: {args.stage_a_steps} steps, final loss {sum(losses[-20:]) / len(losses[-20:]):.4f}, "
              f"{time.process_time() - t:.0f} s CPU")
    if args.part in ("all", "encoder"):
        t = time.process_time()
        enc, prev, losses = demo.train_encoder_previewer(args.encoder_steps, args.encoder_batch_size,
                                                         learning_rate=args.encoder_learning_rate, seed=args.seed)
        for net, name in ((enc, "effnet_encoder"), (prev, "previewer")):
            save_network(net, os.path.join(args.output_dir, f"{name}.safetensors"))
            written.append(os.path.join(args.output_dir, f"{name}.safetensors"))
        print(f"encoder + previewer: {args.encoder_steps} steps, final loss "
              f"{sum(losses[-20:]) / len(losses[-20:]):.4f}, {time.process_time() - t:.0f} s CPU")
    print("\n".join(written))
    return written


if __name__ == "__main__":
    raise SystemExit(run_main(main))
