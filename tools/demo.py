"""Demo: every edit of the pack on the real ComfyUI server, with the TinySD and TinyFlux demo models.

    bash tools/setup.sh && OMP_NUM_THREADS=1 .venv/bin/python tools/demo.py

Starts ComfyUI headless (tests/server.py), submits one API-format graph per edit (tools/graphs.py:
source branch with AttentionStore, target branch with the edit node, same seed), and writes
out/demo/<edit>_source.png, out/demo/<edit>_edited.png and out/demo/demo_grid.png (source row
above edited row, x2 nearest-neighbour). The real-image edits run the committed workflows
workflows/api/real_*_tinysd.json on demo_model/red_circle.png (a rendered image, not a sample): the
source row is then the reconstruction of that image by inversion. The same edits on TinyFlux (Flux's
architecture) write out/demo/flux_<edit>_{source,edited}.png and out/demo/demo_grid_flux.png.
`--ckpt NAME --size 512` runs the TinySD graphs with CheckpointLoaderSimple on a checkpoint of that
ComfyUI's models/checkpoints instead.
"""
from __future__ import annotations

import argparse
import io
import os
import pathlib
import shutil
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import comfyui_env  # noqa: E402
import graphs  # noqa: E402

# name -> (edit, source prompt, target prompt, edit-node inputs, local-blend inputs)
DEMOS = {
    "replace_color": ("replace", "a red circle", "a blue circle", {}, None),
    "replace_shape": ("replace", "a red circle", "a red square", {}, None),
    "refine_background": ("refine", "a red circle", "a red circle on a black background", {}, None),
    "reweight": ("reweight", "a red circle on a gray background", "a red circle on a gray background",
                 {"weights": "red=-1.0"}, None),
    "local_blend": ("local_blend", "a red circle on a gray background", "a blue circle on a gray background",
                    {}, {"source_words": "red", "target_words": "blue", "threshold": 0.5, "dilate": 0}),
    "fpe": ("fpe", "a red circle", "a blue circle", {}, None),
}
# real-image edits: the committed API workflows (LoadImage of demo_model/red_circle.png -> DDIMInvert -> ...)
REAL_DEMOS = {
    "real_fpe": ("workflows/api/real_fpe_tinysd.json", "a blue circle (FPE, inverted image)"),
    "real_p2p_blend": ("workflows/api/real_p2p_local_blend_tinysd.json", "a blue circle (P2P + blend, inverted)"),
    "flux_real_fpe": ("workflows/api/real_fpe_tinyflux.json", "a blue circle (FPE, inverted image)"),
    "flux_real_p2p_blend": ("workflows/api/real_p2p_local_blend_tinyflux.json", "a blue circle (P2P + blend, inverted)"),
}
# TinyFlux (Flux's architecture): name -> (edit, source prompt, target prompt, edit-node inputs, blend)
FLUX_DEMOS = {
    "flux_replace_color": ("replace", "a red circle", "a blue circle", {}, None),
    "flux_replace_shape": ("replace", "a red circle", "a red square", {}, None),
    "flux_refine_background": ("refine", "a red circle", "a red circle on a black background", {}, None),
    "flux_local_blend": ("local_blend", "a red circle on a gray background", "a blue circle on a gray background",
                         {}, {"source_words": "red", "target_words": "blue", "threshold": 0.5, "dilate": 0}),
    "flux_fpe": ("fpe", "a red circle", "a blue circle", {}, None),
}

MAP_WORDS = ("red", "background")


def attention_map_graph(seed: int, steps: int, cfg: float, size: int, loader: dict) -> dict:
    """The replace demo's source branch plus AttentionMapPreview of each of MAP_WORDS (overlay and mask)."""
    g = graphs.edit_graph("replace", "a red circle on a gray background", "a blue circle on a gray background",
                          seed, steps=steps, cfg=cfg, size=size, loader=loader, prefix="demo/maps")
    for word in MAP_WORDS:
        g[f"map_{word}"] = {"class_type": "AttentionMapPreview", "inputs": {
            "store": ["store", 2], "source_latent": ["source_sampler", 0], "image": ["source_decode", 0],
            "words": word, "layers": "level 1", "start": 0.0, "end": 1.0, "threshold": 0.5}}
        g[f"map_{word}_save"] = {"class_type": "SaveImage", "inputs": {"images": [f"map_{word}", 0],
                                                                      "filename_prefix": f"demo/map_{word}"}}
        g[f"mask_{word}"] = {"class_type": "MaskToImage", "inputs": {"mask": [f"map_{word}", 1]}}
        g[f"mask_{word}_save"] = {"class_type": "SaveImage", "inputs": {"images": [f"mask_{word}", 0],
                                                                       "filename_prefix": f"demo/mask_{word}"}}
    return g


def real_graph(name: str) -> tuple[dict, str, str]:
    """(API graph, id of its source SaveImage, id of its edited SaveImage)."""
    import json
    graph = json.loads((REPO / REAL_DEMOS[name][0]).read_text())
    saves = {n["inputs"]["filename_prefix"]: nid for nid, n in graph.items() if n["class_type"] == "SaveImage"}
    for nid in saves.values():
        graph[nid]["inputs"]["filename_prefix"] = f"demo/{name}_" + graph[nid]["inputs"]["filename_prefix"][4:]
    return graph, saves["p2p/source"], saves["p2p/edited"]


def grid(rows: list[tuple[str, list]], columns: list[tuple[str, str]], scale: int = 2):
    """Images (PIL) in rows, each upscaled x`scale` (NEAREST), a label left of each row and two
    label lines (edit name, target prompt) above each column."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    w, h = (d * scale for d in rows[0][1][0].size)
    pad, left, top = 10, 64, 40
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    col_w = max([w] + [int(measure.textlength(t, font=font)) + 1 for c in columns for t in c])
    canvas = Image.new("RGB", (left + len(columns) * (col_w + pad), top + len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (name, subtitle) in enumerate(columns):
        x = left + c * (col_w + pad)
        draw.text((x, 4), name, fill="black", font=font)
        draw.text((x, 21), subtitle, fill=(90, 90, 90), font=font)
    for r, (label, images) in enumerate(rows):
        y = top + r * (h + pad)
        draw.text((6, y + h // 2 - 7), label, fill="black", font=font)
        for c, im in enumerate(images):
            x = left + c * (col_w + pad) + (col_w - w) // 2
            canvas.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (x, y))
    return canvas


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "out" / "demo"), help="output folder (default out/demo)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--only", nargs="+", choices=list(DEMOS) + list(REAL_DEMOS) + list(FLUX_DEMOS),
                    help="run only these edits")
    ap.add_argument("--ckpt", help="use CheckpointLoaderSimple with this checkpoint instead of TinySD")
    ap.add_argument("--size", type=int, default=128, help="image size in pixels (TinySD: 128)")
    args = ap.parse_args(argv)
    from PIL import Image

    t0 = time.perf_counter()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loader = graphs.checkpoint_loader(args.ckpt) if args.ckpt else graphs.TINYSD
    names = args.only or list(DEMOS) + ([] if args.ckpt else list(REAL_DEMOS) + list(FLUX_DEMOS))
    names = sorted(names, key=lambda n: n.startswith("flux_"))  # TinySD's, then TinyFlux's (the grids' order)
    server_mod = comfyui_env.server_module()
    workdir = tempfile.mkdtemp(prefix="attn-edit-demo-")
    server = server_mod.ComfyServer(workdir)
    print(f"starting ComfyUI ({server.comfyui}) ...", flush=True)
    failed = []
    try:
        server.start(timeout=120)
        print(f"  ready in {time.perf_counter() - t0:.1f} s on port {server.port}", flush=True)
        queued, save_ids, titles = {}, {}, {}
        shutil.copy(REPO / "demo_model" / "red_circle.png", server.workdir / "input" / "attention_edit_red_circle.png")
        for name in names:
            if name in REAL_DEMOS:
                g, *save_ids[name] = real_graph(name)
                titles[name] = REAL_DEMOS[name][1]
            elif name in FLUX_DEMOS:
                edit, source, target, inputs, blend = FLUX_DEMOS[name]
                if edit in ("replace", "refine", "local_blend"):
                    inputs = {**graphs.TINYFLUX_P2P, **inputs}
                g = graphs.edit_graph(edit, source, target, args.seed, steps=args.steps, cfg=graphs.TINYFLUX_CFG,
                                      size=128, loader=graphs.TINYFLUX, scheduler=graphs.TINYFLUX_SCHEDULER,
                                      prefix=f"demo/{name}", edit_inputs=inputs, blend=blend)
                save_ids[name] = [graphs.SOURCE_SAVE, graphs.EDITED_SAVE]
                titles[name] = target
            else:
                edit, source, target, inputs, blend = DEMOS[name]
                if not args.ckpt and edit in ("replace", "refine", "local_blend"):
                    inputs = {**graphs.TINYSD_P2P, **inputs}  # TinySD's P2P schedule (graphs.py says why)
                g = graphs.edit_graph(edit, source, target, args.seed, steps=args.steps, cfg=args.cfg, size=args.size,
                                      loader=loader, prefix=f"demo/{name}", edit_inputs=inputs, blend=blend,
                                      store={"token_map_level": "level 1"} if blend else None)  # TinySD's colour
                # words localise at 8x8 (level 1), not at P2P's 16x16
                save_ids[name] = [graphs.SOURCE_SAVE, graphs.EDITED_SAVE]
                titles[name] = target + (f" [{inputs['weights']}]" if "weights" in inputs else "")
            queued[name] = server.queue(g)
        maps_id = server.queue(attention_map_graph(args.seed, args.steps, args.cfg, args.size, loader))
        results = {}
        for name in names:
            t = time.perf_counter()
            try:
                entry = server.wait(queued[name], timeout=600)
            except server_mod.ServerError as e:
                print(f"  {name}: FAILED: {e}", flush=True)
                failed.append(name)
                continue
            pair = []
            for node, role in zip(save_ids[name], ("source", "edited")):
                (ref,) = server.image_refs(entry, node)
                data = server.image_bytes(ref)
                path = out / f"{name}_{role}.png"
                path.write_bytes(data)
                pair.append(Image.open(io.BytesIO(data)).convert("RGB"))
                print(f"  wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}", flush=True)
            results[name] = pair
            print(f"  {name}: -> {titles[name]!r} ({time.perf_counter() - t:.1f} s)", flush=True)
        for sheet_name, members in (("demo_grid.png", [n for n in results if not n.startswith("flux_")]),
                                    ("demo_grid_flux.png", [n for n in results if n.startswith("flux_")])):
            if members:
                cols = [(n.removeprefix("flux_"), titles[n]) for n in members]
                sheet = grid([("source", [results[n][0] for n in members]), ("edited", [results[n][1] for n in members])],
                             cols)
                sheet.save(out / sheet_name)
                print(f"  wrote {out / sheet_name}", flush=True)
        entry = server.wait(maps_id, timeout=600)
        pictures = [Image.open(io.BytesIO(server.image_bytes(server.image_refs(entry, graphs.SOURCE_SAVE)[0])))]
        for word in MAP_WORDS:
            for kind in ("map", "mask"):
                ref = server.image_refs(entry, f"{kind}_{word}_save")[0]
                pictures.append(Image.open(io.BytesIO(server.image_bytes(ref))).convert("RGB"))
        cols = [("source", "a red circle on a gray ...")] + [(f"{k} '{w}'", "AttentionMapPreview")
                                                              for w in MAP_WORDS for k in ("map", "mask")]
        grid([("", pictures)], cols).save(out / "attention_maps.png")
        print(f"  wrote {out / 'attention_maps.png'}", flush=True)
    except server_mod.ServerError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        failed.append("server")
    finally:
        server.stop()
    if failed:
        print(f"failed: {', '.join(failed)}; server log kept at {server.log_path}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"total {time.perf_counter() - t0:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
