"""The edit experiments on TinySD, shared by tools/eval_edits.py (full numbers) and the tests
(smaller batches): source and target branches through the pack's nodes and ComfyUI's sampler."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import inproc


@dataclass(frozen=True)
class EditCase:
    kind: str  # "colour" | "shape" | "refine"
    source: str
    target: str
    colour: str  # expected colour of the edited image
    shape: str  # expected shape
    background: str | None = None  # expected background (refine)
    blend_words: str = ""  # source/target word whose region may change (local blend)


CASES = [
    EditCase("colour", "a red circle", "a blue circle", "blue", "circle", blend_words="circle"),
    EditCase("colour", "a green square", "a yellow square", "yellow", "square", blend_words="square"),
    EditCase("shape", "a red circle", "a red square", "red", "square", blend_words="circle|square"),
    EditCase("shape", "a blue triangle", "a blue circle", "blue", "circle", blend_words="triangle|circle"),
    EditCase("refine", "a red circle", "a red circle on a black background", "red", "circle", "black"),
    EditCase("refine", "a yellow triangle", "a yellow triangle on a gray background", "yellow", "triangle", "gray"),
]
METHODS = ("seed only", "P2P", "P2P + local blend", "FPE")


def psnr_outside(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    keep = ~mask
    if not keep.any():
        return float("nan")
    mse = float(((a[keep] - b[keep]) ** 2).mean())
    return 99.0 if mse < 1e-10 else 10 * np.log10(1.0 / mse)


def run_case(tiny: inproc.Tiny, case: EditCase, seed: int, batch: int, methods=METHODS) -> dict[str, list[dict]]:
    """Per method, per sample: success, structure IoU and background PSNR against the source."""
    import shapes

    store_node = tiny.node("AttentionStore")
    src_model, src_pos, store = store_node.execute(tiny.model, tiny.clip, case.source, 1.0, "fpe", 1.0,
                                                   "model dtype").result
    source = tiny.sample(src_model, src_pos, seed, batch)
    src_imgs = tiny.images(source)
    edit = tiny.node("P2PRefine" if case.kind == "refine" else "P2PReplace")
    p2p_model, tgt_pos = edit.execute(tiny.model, tiny.clip, store, source, case.target, 0.8, "", 0.4,
                                      "p2p_16").result
    models = {"seed only": tiny.model, "P2P": p2p_model}
    if "P2P + local blend" in methods and case.blend_words:
        s_words, _, t_words = case.blend_words.partition("|")
        models["P2P + local blend"] = tiny.node("P2PLocalBlend").execute(
            p2p_model, s_words, t_words or s_words, 0.3, 0.2, "").result[0]
    if "FPE" in methods:
        models["FPE"] = tiny.node("FPESelfAttnInject").execute(tiny.model, store, source, "fpe", 1.0).result[0]
    out: dict[str, list[dict]] = {}
    src_cls = [shapes.classify(im) for im in src_imgs]
    for name in methods:
        if name not in models:
            continue
        imgs = tiny.images(tiny.sample(models[name], tgt_pos, seed, batch))
        rows = []
        for s_img, s_cls, img in zip(src_imgs, src_cls, imgs):
            got = shapes.classify(img)
            ok = got.colour == case.colour and got.shape == case.shape
            if case.background:
                ok = ok and got.background == case.background
            union = s_cls.mask | got.mask
            rows.append({"success": ok, "iou": shapes.iou(s_cls.mask, got.mask),
                         "psnr_bg": psnr_outside(s_img, img, union)})
        out[name] = rows
    return out


def summarise(rows: list[dict]) -> dict[str, float]:
    ps = [r["psnr_bg"] for r in rows if np.isfinite(r["psnr_bg"])]
    return {"n": len(rows), "success": float(np.mean([r["success"] for r in rows])),
            "iou": float(np.mean([r["iou"] for r in rows])), "psnr_bg": float(np.median(ps)) if ps else float("nan")}


def reweight_sweep(tiny: inproc.Tiny, seed: int, batch: int, weights=(-2.0, -1.0, 0.0, 1.0, 2.0)):
    """'a red circle' re-weighted with red=c: (mean image redness r - (g+b)/2, latent) per c."""
    src_model, pos, store = tiny.node("AttentionStore").execute(tiny.model, tiny.clip, "a red circle", 1.0, "none",
                                                                1.0, "model dtype").result
    source = tiny.sample(src_model, pos, seed, batch)
    out = []
    for c in weights:
        model, tgt_pos = tiny.node("P2PReweight").execute(tiny.model, tiny.clip, store, source, "a red circle",
                                                          f"red={c}", 0.8).result
        latent = tiny.sample(model, tgt_pos, seed, batch)
        img = tiny.images(latent)
        out.append((float((img[..., 0] - (img[..., 1] + img[..., 2]) / 2).mean()), latent))
    return source, out
