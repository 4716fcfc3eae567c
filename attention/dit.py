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
import torch.nn.functional as F

from .controllers import LayerPatch, Recorder, Shared, chunk_rows, chunks
from .inject import run_jobs
from .joint import JOINT_LAYOUT, image_block_heads, image_rows, join_heads, split_heads
from .layers import AttentionLayer
from .record import COND, RecordError


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


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b view the same elements (the source's image queries that both parts read)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


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

    def rows(self, c: int, rows: slice, q, k, v, heads: int, text: int, plans: dict, plain) -> torch.Tensor:
        """One chunk's joint attention output in head layout (b, heads, L, D), its image rows edited
        as its plans say (`plain(q, k, v)`: where they say nothing). q, k, v: the call's, in head layout."""
        cross_jobs = plans["attn2"][c][0] if "attn2" in plans else None
        self_jobs = plans["attn1"][c][0] if "attn1" in plans else None
        q, k, v = (chunk_rows(t, rows) for t in (q, k, v))
        if cross_jobs is None and self_jobs is None:
            return plain(q, k, v)
        text_rows = F.scaled_dot_product_attention(q[:, :, :text], k, v)
        if self_jobs and cross_jobs and len(cross_jobs) == 1 and same_tensor(cross_jobs[0][0], self_jobs[0][0]):
            # P2P with both injected and no share of the target's own map (wt = 0): the row is the
            # source's whole joint map, its text columns read through the alignment (m X + B in one call)
            ((q_s, k_s, v_image),), v_text = self_jobs, cross_jobs[0][2]
            v_s = torch.cat([split_heads(v_text, heads), v_image], 2)
            image = F.scaled_dot_product_attention(split_heads(q_s, heads), split_heads(k_s, heads), v_s)
            return torch.cat([text_rows, image], 2)
        # the image rows are m X + B: X the text block's distribution (P2P-edited, or the target's own),
        # (B, m) the image block and the text mass it leaves (the source's when injected, else the target's)
        if cross_jobs:
            x = split_heads(run_jobs([cross_jobs], heads, self.controller.attention)[0], heads)
        else:
            x = F.scaled_dot_product_attention(q[:, :, text:], k[:, :, :text], v[:, :, :text])
        if self_jobs:  # the source's image queries and sequence (pack layout), our image values (head layout)
            ((q_b, k_b, v_image),) = self_jobs
            q_b, k_b = split_heads(q_b, heads), split_heads(k_b, heads)
        else:
            q_b, k_b, v_image = q[:, :, text:], k, v[:, :, text:]
        block, mass = image_block_heads(q_b, k_b, v_image)
        return torch.cat([text_rows, image_rows(x, block, mass)], 2)

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
        if (cross is None and own is None) or layout is None or COND not in opts.get("cond_or_uncond", ()):
            return self.plain(func, *args, **kwargs)  # the store keeps, and the edits change, the conditional half only
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
        if not skip:  # SD3: (B, L, heads * D), its values (B, L, heads, D): as Flux's (B, heads, L, D) views
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        extra = dict(opts, n_heads=heads, original_shape=list(latent_shape))
        # the image->text part as a cross-attention; the image->image part as the image queries over the
        # whole sequence, on the image values (its output is the row's image block and text mass, joint.py).
        # The parts see the pack's layout (B, L, heads * D), except the image values that the image
        # block reads in head layout.
        qi, k_all = join_heads(q[:, :, text:]), join_heads(k)
        if recording:
            shared: dict = {}  # both parts' image queries are one tensor: kept once; copies made here are kept as made
            for made, given in ((qi, args[0]), (k_all, args[1])):
                if made.untyped_storage().data_ptr() != given.untyped_storage().data_ptr():  # a copy, not a view
                    ctl.record.offer(made, shared)
            ctl.record_parts([(p, kp) for p, kp in ((cross, k_all[:, :text]), (own, k_all)) if p is not None],
                             qi, extra, shared)
            return self.plain(func, *args, **kwargs)
        parts = []
        if cross is not None:
            parts.append((cross, qi, k_all[:, :text], join_heads(v[:, :, :text])))
        if own is not None:
            parts.append((own, qi, k_all, v[:, :, text:]))
        plans = {p.kind: ctl.plan(p, qp, kp, vp, extra) for p, qp, kp, vp in parts}
        if all(jobs is None for plan in plans.values() for jobs, *_ in plan):
            return self.plain(func, *args, **kwargs)

        def plain(qc, kc, vc):  # a chunk that nothing edits: ComfyUI's attention (or the previous override's)
            return self.plain(func, qc, kc, vc, heads, **dict(kwargs, skip_reshape=True, skip_output_reshape=True))

        kwargs.pop("heads", None)
        pieces = [self.rows(c, rows, q, k, v, heads, text, plans, plain) for c, (_, rows) in enumerate(chunks(extra, q.shape[0]))]
        out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        return out if kwargs.get("skip_output_reshape", False) else join_heads(out)
