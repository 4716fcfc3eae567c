"""The edit experiments on TinySD, shared by tools/eval_edits.py (full numbers) and the tests
(smaller batches): source and target branches through the pack's nodes and ComfyUI's sampler."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

import graphs
import inproc


@dataclass(frozen=True)
class EditCase:
    kind: str  # "colour" | "shape" | "refine"
    source: str
    target: str
    colour: str  # expected colour of the edited image
    shape: str  # expected shape
    background: str | None = None  # expected background (refine)
    blend_words: str = ""  # source|target words whose region may change (local blend)


# Local blend uses the colour words: on TinySD they sit on the shape at 8x8 (level 1; mask IoU with
# the shape 0.82 at threshold 0.5), while its shape nouns do not localise (IoU 0.09).
BLEND = {"token_map_level": "level 1", "threshold": 0.5, "dilate": 0}
CASES = [
    EditCase("colour", "a red circle", "a blue circle", "blue", "circle", blend_words="red|blue"),
    EditCase("colour", "a green square", "a yellow square", "yellow", "square", blend_words="green|yellow"),
    EditCase("shape", "a red circle", "a red square", "red", "square", blend_words="red|red"),
    EditCase("shape", "a blue triangle", "a blue circle", "blue", "circle", blend_words="blue|blue"),
    EditCase("refine", "a red circle", "a red circle on a black background", "red", "circle", "black"),
    EditCase("refine", "a yellow triangle", "a yellow triangle on a gray background", "yellow", "triangle", "gray"),
]
METHODS = ("seed only", "P2P, SD1.5 defaults", "P2P", "P2P + local blend", "FPE")


def psnr_outside(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    keep = ~mask
    if not keep.any():
        return float("nan")
    mse = float(((a[keep] - b[keep]) ** 2).mean())
    return 99.0 if mse < 1e-10 else 10 * np.log10(1.0 / mse)


def run_case(tiny: inproc.Tiny, case: EditCase, seed: int, batch: int, methods=METHODS,
             blend: dict = BLEND, p2p: dict = graphs.TINYSD_P2P, fpe: dict = graphs.FPE_DEFAULTS) -> dict[str, list[dict]]:
    """Per method, per sample: success, structure IoU and background PSNR against the source."""
    import shapes

    store_node = tiny.node("AttentionStore")
    src_model, src_pos, store = store_node.execute(tiny.model, tiny.clip, case.source, 1.0, "all", 1.0,
                                                   "model dtype", token_map_level=blend["token_map_level"]).result
    source = tiny.sample(src_model, src_pos, seed, batch)
    src_imgs = tiny.images(source)
    edit = tiny.node("P2PRefine" if case.kind == "refine" else "P2PReplace").execute
    models = {"seed only": tiny.model}
    if "P2P, SD1.5 defaults" in methods:
        models["P2P, SD1.5 defaults"] = edit(tiny.model, tiny.clip, store, source, case.target, word_schedules="",
                                             **graphs.P2P_DEFAULTS).result[0]
    p2p_model, tgt_pos = edit(tiny.model, tiny.clip, store, source, case.target, word_schedules="", **p2p).result
    models["P2P"] = p2p_model
    if "P2P + local blend" in methods and case.blend_words:
        s_words, _, t_words = case.blend_words.partition("|")
        models["P2P + local blend"] = tiny.node("P2PLocalBlend").execute(
            p2p_model, s_words, t_words or s_words, blend["threshold"], 0.2, "", blend["dilate"]).result[0]
    if "FPE" in methods:
        models["FPE"] = tiny.node("FPESelfAttnInject").execute(tiny.model, store, source, **fpe).result[0]
    out: dict[str, list[dict]] = {}
    for name in methods:
        if name in models:
            imgs = tiny.images(tiny.sample(models[name], tgt_pos, seed, batch))
            out[name] = [_measure(shapes, case, s_img, img) for s_img, img in zip(src_imgs, imgs)]
    return out


def case_images(case: EditCase, seed: int, batch: int) -> np.ndarray:
    """'Real' images for a case: rendered shapes of the source's colour and shape at random places,
    sizes and backgrounds (not samples of the model)."""
    import shapes

    colour, shape = case.source.split()[1:3]
    rng = np.random.default_rng([seed, 99])
    specs = [dataclasses.replace(shapes.random_spec(rng), colour=colour, shape=shape) for _ in range(batch)]
    return np.stack([shapes.render(s) for s in specs])


def run_real_case(tiny: inproc.Tiny, case: EditCase, seed: int, batch: int) -> dict[str, list[dict]]:
    """The same measures on inverted images: DDIM inversion with the source prompt (P2P) or an empty
    one (FPE), the source branch reconstructing by direct inversion, the target branch editing."""
    import shapes

    node, neg = tiny.node, tiny.encode("")
    latent = tiny.encode_images(case_images(case, seed, batch))
    tgt_pos = tiny.encode(case.target)
    targets, sources = {}, {}
    for method, source_prompt in (("P2P", case.source), ("FPE", "")):
        inverted = node("DDIMInvert").execute(tiny.model, tiny.encode(source_prompt), neg, latent, tiny.steps,
                                              tiny.scheduler, 1.0).result
        m, src_pos, store = node("AttentionStore").execute(tiny.model, tiny.clip, source_prompt, 1.0, "all", 1.0,
                                                           "model dtype", inversion=inverted[1]).result
        source = tiny.sample_branch(m, src_pos, inverted, neg)
        sources[method] = tiny.images(source)
        if method == "P2P":
            targets["seed only"] = tiny.sample_branch(tiny.model, tgt_pos, inverted, neg)
            edited = node("P2PReplace").execute(tiny.model, tiny.clip, store, source, case.target, word_schedules="",
                                                **graphs.TINYSD_P2P).result[0]
        else:
            edited = node("FPESelfAttnInject").execute(tiny.model, store, source, **graphs.FPE_DEFAULTS).result[0]
        targets[method] = tiny.sample_branch(edited, tgt_pos, inverted, neg)
    out: dict[str, list[dict]] = {}
    for method, latent_out in targets.items():
        src_imgs = sources["FPE" if method == "FPE" else "P2P"]
        out[method] = [_measure(shapes, case, s_img, img) for s_img, img in zip(src_imgs, tiny.images(latent_out))]
    return out


def _measure(shapes, case: EditCase, s_img: np.ndarray, img: np.ndarray) -> dict:
    s_cls, got = shapes.classify(s_img), shapes.classify(img)
    right = {"colour": got.colour == case.colour, "shape": got.shape == case.shape,
             "refine": got.background == case.background}
    ok = right["colour"] and right["shape"] and (not case.background or right["refine"])
    return {"success": ok, "edited": right[case.kind], "iou": shapes.iou(s_cls.mask, got.mask),
            "shift": centre_shift(s_cls.mask, got.mask), "psnr_bg": psnr_outside(s_img, img, s_cls.mask | got.mask)}


def ideal_iou(case: EditCase) -> float:
    """IoU of the source's and the target's shape drawn at the same place and size: what a perfect
    shape swap scores on structure (a circle and a square of equal area overlap at 0.83)."""
    import shapes

    colour, shape = case.source.split()[1:3]
    spec = shapes.ShapeSpec(colour, shape, "white", cx=64, cy=64, radius=36)
    a, b = (shapes.classify(shapes.render(dataclasses.replace(spec, shape=s))).mask for s in (shape, case.shape))
    return shapes.iou(a, b)


def centre_shift(a: np.ndarray, b: np.ndarray) -> float:
    """Distance in pixels between two masks' centroids: where the object is, whatever its shape
    (a shape swap cannot keep the mask, but it can keep the place)."""
    if not a.any() or not b.any():
        return float(np.hypot(*a.shape))
    return float(np.hypot(*(np.argwhere(a).mean(0) - np.argwhere(b).mean(0))))


def summarise(rows: list[dict]) -> dict[str, float]:
    ps = [r["psnr_bg"] for r in rows if np.isfinite(r["psnr_bg"])]
    return {"n": len(rows), "success": float(np.mean([r["success"] for r in rows])),
            "edited": float(np.mean([r["edited"] for r in rows])),
            "iou": float(np.mean([r["iou"] for r in rows])), "shift": float(np.median([r["shift"] for r in rows])),
            "psnr_bg": float(np.median(ps)) if ps else float("nan")}


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
