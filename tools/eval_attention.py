"""Is TinySD fit for testing attention editing? Through the pack's own nodes and ComfyUI's sampler:

1. injecting a sample's own maps (self and cross, every layer, every step) changes nothing;
2. injecting another seed's self-attention pulls the layout towards that seed: IoU of the
   target's shape mask with the other seed's rises well above the IoU of two unrelated seeds;
3. cross-attention localises the colour and shape words on the shape (attention inside the
   shape's mask / outside it, from the store's token maps);
4. local blend's mask from each word, at P2P's map level and at level 1, with P2P's settings
   (threshold 0.3, 3x3 dilation) and with TinySD's (0.5, none): IoU with the shape's mask.

    OMP_NUM_THREADS=1 .venv/bin/python tools/eval_attention.py --batch 16
"""
from __future__ import annotations

import argparse
import importlib

import numpy as np
import torch

import inproc


def layout_pull(tiny: inproc.Tiny, prompt: str, layers: str, batch: int, seed_a: int, seed_b: int) -> tuple[float, float]:
    """(IoU(A, B) of plain samples, IoU(A with B's self-attention injected, B))."""
    import shapes

    src_model, src_pos, store = tiny.node("AttentionStore").execute(tiny.model, tiny.clip, prompt, 0.0, layers, 1.0,
                                                                    "model dtype").result
    b = tiny.sample(src_model, src_pos, seed_b, batch)
    a = tiny.sample(tiny.model, src_pos, seed_a, batch)
    fpe = tiny.node("FPESelfAttnInject").execute(tiny.model, store, b, layers, 1.0).result[0]
    a_inj = tiny.sample(fpe, src_pos, seed_a, batch)
    masks = {k: [shapes.classify(im).mask for im in tiny.images(v)] for k, v in (("a", a), ("b", b), ("ai", a_inj))}
    base = np.mean([shapes.iou(x, y) for x, y in zip(masks["a"], masks["b"])])
    pulled = np.mean([shapes.iou(x, y) for x, y in zip(masks["ai"], masks["b"])])
    return float(base), float(pulled)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    tiny = inproc.Tiny.load()
    import shapes

    prompt = "a red circle"
    # 1. own maps
    src_model, src_pos, store = tiny.node("AttentionStore").execute(tiny.model, tiny.clip, prompt, 1.0, "all", 1.0,
                                                                    "model dtype").result
    plain = tiny.sample(tiny.model, src_pos, 5, args.batch)
    src = tiny.sample(src_model, src_pos, 5, args.batch)
    own = tiny.node("P2PReplace").execute(tiny.model, tiny.clip, store, src, prompt, 1.0, "", 1.0, "all").result[0]
    same = tiny.sample(own, src_pos, 5, args.batch)
    print(f"1. own maps injected (self+cross, all 16 layers, all steps): max |latent - plain| = "
          f"{(same['samples'] - plain['samples']).abs().max().item():.2e}; recording alone: "
          f"{(src['samples'] - plain['samples']).abs().max().item():.2e}")
    # 2. another seed's self-attention
    for layers in ("all", "fpe"):
        base, pulled = layout_pull(tiny, prompt, layers, args.batch, 101, 202)
        print(f"2. self-attention of seed B injected into seed A ({layers} layers, all steps): "
              f"IoU(A, B) {base:.2f} -> IoU(A', B) {pulled:.2f}  ({args.batch} pairs)")
    # 3. cross-attention localisation (token maps kept by the store, summed over steps)
    imgs = tiny.images(src)
    maps = store.cumulative_maps(store.num_steps)  # B, T, h, w
    for word in ("red", "circle"):
        pos = store.prompt.positions(word)
        m = torch.nn.functional.interpolate(maps[:, pos].sum(1, keepdim=True).float(), size=(128, 128), mode="nearest")
        ratios = []
        for img, mm in zip(imgs, m[:, 0].numpy()):
            mask = shapes.classify(img).mask
            if mask.any() and (~mask).any():
                ratios.append(mm[mask].mean() / max(mm[~mask].mean(), 1e-9))
        print(f"3. cross-attention of '{word}' (level-{store.map_level} layers): inside/outside the shape "
              f"= {np.median(ratios):.1f} (median of {len(ratios)})")

    # 4. local blend's masks
    inject = importlib.import_module(type(store).__module__.rsplit(".", 1)[0] + ".inject")
    for level in ("auto", "level 1"):
        m, pos_, st = tiny.node("AttentionStore").execute(tiny.model, tiny.clip, prompt, 1.0, "none", 1.0,
                                                          "model dtype", token_map_level=level).result
        out = tiny.sample(m, pos_, 5, args.batch)
        shape_masks = [torch.from_numpy(shapes.classify(im).mask) for im in tiny.images(out)]
        maps = st.cumulative_maps(st.num_steps)
        for word in ("red", "circle"):
            for threshold, dilate in ((0.3, 1), (0.5, 0)):
                mask = inject.blend_mask(maps, None, st.prompt.positions(word), [], (128, 128), threshold, dilate=dilate)
                ious = [shapes.iou(mk[0].bool().numpy(), sm.numpy()) for mk, sm in zip(mask, shape_masks)]
                print(f"4. local-blend mask of '{word}', maps of level {st.map_level}, threshold {threshold}, "
                      f"dilate {dilate}: IoU with the shape {np.mean(ious):.2f}, area {mask.mean().item():.2f}")


if __name__ == "__main__":
    main()
