"""The flow-transformer adapter: Flux's and SD3's joint attention, addressed and patched.

A layer is one block's joint attention, `AttentionLayer(block, i, 0, index, level 0)` with block
"double" / "single" (Flux) or "joint" (SD3's MM-DiT); every layer sees the same image tokens.
Each layer is edited as two parts (see joint.py): its image->text part as the UNet's
cross-attention ("attn2") and its image->image part as its self-attention ("attn1"), so the
Recorder and the Editor serve both architectures unchanged.

ComfyUI calls `transformer_options["optimized_attention_override"](func, q, k, v, heads, ...)`
from every attention function. Flux names the running block in transformer_options (block_type,
block_index); SD3 does not, so a per-block "dit" replace patch (`BlockName`) names it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .controllers import LayerPatch, Recorder, Shared, chunks
from .inject import run_jobs
from .joint import JOINT_LAYOUT, image_block, image_rows, join_heads
from .layers import AttentionLayer
from .record import RecordError


def is_dit(model: torch.nn.Module) -> bool:
    """A flow transformer this adapter addresses (Flux's double/single blocks, SD3's joint blocks)."""
    return hasattr(model, "double_blocks") or hasattr(model, "joint_blocks")


def dit_attention_layers(model: torch.nn.Module) -> list[AttentionLayer]:
    """Flux's double then single blocks, or SD3's joint blocks, in forward order."""
    if hasattr(model, "double_blocks"):
        if any(getattr(b, "flipped_img_txt", False) for b in model.double_blocks):
            raise TypeError("its double blocks put the image tokens before the text (flipped_img_txt)")
        names = [("double", i) for i in range(len(model.double_blocks))]
        names += [("single", i) for i in range(len(getattr(model, "single_blocks", [])))]
    elif hasattr(model, "joint_blocks"):
        names = [("joint", i) for i in range(len(model.joint_blocks))]
    else:
        raise TypeError(f"{type(model).__name__} has neither Flux's double/single blocks nor SD3's joint blocks")
    return [AttentionLayer(block, i, 0, n, 0) for n, (block, i) in enumerate(names)]


def image_tokens(latent_shape: tuple[int, ...], patch_size: int) -> int:
    """Tokens of the latent's patch grid (Flux and SD3 pad the latent to whole patches)."""
    h, w = latent_shape[-2:]
    return -(-h // patch_size) * -(-w // patch_size)


@dataclass
class BlockName(Shared):
    """SD3's per-block "dit" replace patch: names the block in transformer_options, then runs
    the block (or another pack's replace patch of it) unchanged."""
    index: int
    previous: object = None

    def __call__(self, args: dict, extra: dict) -> dict:
        opts = args.get("transformer_options")
        if opts is not None:
            opts["block_type"], opts["block_index"] = "joint", self.index
        return self.previous(args, extra) if self.previous is not None else extra["original_block"](args)


@dataclass
class JointPatch(Shared):
    """ComfyUI's attention override for a flow transformer: edits the joint attention of the
    patched layers, and runs every other attention call (text-only, SD3.5's image-only second
    attention, masked calls) as `previous` (another pack's override) or ComfyUI would."""
    controller: object
    patch_size: int
    cross: dict[tuple[str, int], LayerPatch] = field(default_factory=dict)  # image->text parts
    own: dict[tuple[str, int], LayerPatch] = field(default_factory=dict)  # image->image parts
    previous: object = None

    def rows(self, c: int, rows: slice, q, k, v, heads: int, text: int, plans: dict) -> torch.Tensor:
        """One chunk's joint attention output, its image rows edited as its plans say."""
        attend = self.controller.attention
        cross_jobs = plans["attn2"][c][0] if "attn2" in plans else None
        self_jobs = plans["attn1"][c][0] if "attn1" in plans else None
        q, k, v = q[rows], k[rows], v[rows]
        if cross_jobs is None and self_jobs is None:
            return attend(q, k, v, heads)
        qi, kt, vt = q[:, text:], k[:, :text], v[:, :text]
        # the image rows are m X + B: X the text block's distribution (P2P-edited, or the target's own),
        # (B, m) the image block and the text mass it leaves (the source's when injected, else the target's)
        x = run_jobs([cross_jobs], heads, attend)[0] if cross_jobs else attend(qi, kt, vt, heads)
        ((q_b, k_b, v_image),) = self_jobs or [(qi, k, v[:, text:])]
        block, mass = image_block(q_b, k_b, v_image, heads)
        return torch.cat([attend(q[:, :text], k, v, heads), image_rows(x, block, mass)], 1)

    def plain(self, func, *args, **kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        opts = kwargs.get("transformer_options") or {}
        where = (opts.get("block_type"), opts.get("block_index"))
        cross, own = self.cross.get(where), self.own.get(where)
        layout = opts.get(JOINT_LAYOUT)
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        skip = bool(kwargs.get("skip_reshape", False))
        length = q.shape[2] if skip else q.shape[1]
        if (cross is None and own is None) or layout is None:
            return self.plain(func, *args, **kwargs)
        if kwargs.get("mask") is not None:  # e.g. Chroma's T5 padding mask: the parts would need it too
            raise RecordError(f"{getattr(self.controller, 'node', 'AttentionStore')}: this model masks its "
                              "joint attention (an attention mask, as Chroma's), which the pack cannot edit: use a "
                              "Flux.1 or SD3 model")
        latent_shape, text = layout
        if length < text + image_tokens(latent_shape, self.patch_size):  # not the joint call
            return self.plain(func, *args, **kwargs)
        ctl = self.controller
        recording = isinstance(ctl, Recorder)
        if not recording:  # parts that neither inject nor keep maps at this step run as ComfyUI would
            cross, own = (p if p is not None and not ctl.idle(p, opts) else None for p in (cross, own))
            if cross is None and own is None:
                return self.plain(func, *args, **kwargs)
        if skip:  # Flux: (B, heads, L, D)
            q, k = join_heads(q), join_heads(k)
            v = None if recording else join_heads(v)
        else:  # SD3: (B, L, heads * D), its values still (B, L, heads, D)
            q, k, v = (t.reshape(t.shape[0], t.shape[1], -1) for t in (q, k, v))
        extra = dict(opts, n_heads=heads, original_shape=list(latent_shape))
        # the image->text part as a cross-attention; the image->image part as the image queries over the
        # whole sequence, on the image values (its output is the row's image block and text mass, joint.py)
        qi = q[:, text:]
        if recording:
            shared: dict = {}  # both parts' image queries are one tensor: kept once
            for p, kp in ((cross, k[:, :text]), (own, k)):
                if p is not None:
                    ctl.record_attention(p, qi, kp, extra, shared)
            return self.plain(func, *args, **kwargs)
        parts = []
        if cross is not None:
            parts.append((cross, qi, k[:, :text], v[:, :text]))
        if own is not None:
            parts.append((own, qi, k, v[:, text:]))
        plans = {p.kind: ctl.plan(p, qp, kp, vp, extra) for p, qp, kp, vp in parts}
        if all(jobs is None for plan in plans.values() for jobs, *_ in plan):
            return self.plain(func, *args, **kwargs)
        pieces = [self.rows(c, rows, q, k, v, heads, text, plans) for c, (_, rows) in enumerate(chunks(extra, q.shape[0]))]
        out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if kwargs.get("skip_output_reshape", False):
            return out.reshape(out.shape[0], out.shape[1], heads, -1).transpose(1, 2)
        return out
