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

from .controllers import JointSources, LayerPatch, Recorder, Shared, chunk_rows, chunks
from .inject import run_jobs
from .joint import JOINT_LAYOUT, edited_image_rows, image_block_heads, image_rows, join_heads, split_heads
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


def source_heads(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A kept source tensor (head layout, Recorder.record_joint) in like's dtype, device and batch."""
    if t.device != like.device or t.dtype != like.dtype:
        t = t.to(like)
    return t.expand(like.shape[0], *t.shape[1:]) if t.shape[0] != like.shape[0] else t


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
        as the controller's plans say (`plain(q, k, v)`: where they say nothing). q, k, v: the call's,
        in head layout. The general path: local blend's token maps, a recomputed source."""
        cross_jobs = plans["attn2"][c][0] if "attn2" in plans else None
        self_jobs = plans["attn1"][c][0] if "attn1" in plans else None
        q, k, v = (chunk_rows(t, rows) for t in (q, k, v))
        if cross_jobs is None and self_jobs is None:
            return plain(q, k, v)
        own = x = aligned = None
        if self_jobs:  # the source's image queries and sequence (pack layout)
            ((q_s, k_s, _),) = self_jobs
            own = split_heads(q_s, heads), split_heads(k_s, heads)
        if self_jobs and cross_jobs and len(cross_jobs) == 1 and same_tensor(cross_jobs[0][0], self_jobs[0][0]):
            aligned = split_heads(cross_jobs[0][2], heads)  # P2P in both windows, no share of the target's own map
        elif cross_jobs:
            x = split_heads(run_jobs([cross_jobs], heads, self.controller.attention)[0], heads)
        return torch.cat([F.scaled_dot_product_attention(q[:, :, :text], k, v),
                          edited_image_rows(q, k, v, text, own, x, aligned)], 2)

    @staticmethod
    def lean_rows(q, k, v, text: int, src: JointSources) -> torch.Tensor:
        """rows() of a conditional chunk from what Editor.joint_sources looked up, in head layout
        throughout, as the source's tensors are kept: nothing is copied into the pack's layout."""
        own = (source_heads(src.own[0], q), source_heads(src.own[1], q)) if src.own is not None else None
        text_rows = F.scaled_dot_product_attention(q[:, :, :text], k, v)
        if src.cross is None:  # the image->image part alone (FPE; P2P after its cross-attention window)
            block, mass = image_block_heads(*own, v[:, :, text:])
            x = F.scaled_dot_product_attention(q[:, :, text:], k[:, :, :text], v[:, :, :text])
            return torch.cat([text_rows, image_rows(x, block, mass)], 2)

        def carried():  # A diag(ws) V, per head: the target's text values on the source's columns
            aligned = src.aligned.to(v)
            return (aligned if aligned.dim() == 2 else aligned[:, None]) @ v[:, :, :text]
        if own is not None and src.target_weight is None and src.cross[0] is src.own[0]:
            # both parts the source's: the source's joint map on [carried text values; image values]
            values = v if src.aligned is None else torch.cat([carried(), v[:, :, text:]], 2)
            return torch.cat([text_rows, F.scaled_dot_product_attention(*own, values)], 2)
        x = F.scaled_dot_product_attention(*(source_heads(t, q) for t in src.cross),
                                           v[:, :, :text] if src.aligned is None else carried())
        if src.target_weight is not None:  # M_tgt diag(wt) V: refine's new words, re-weighting
            w = src.target_weight.to(v)
            w = w[:, None] if w.dim() == 1 else w[:, None, :, None]
            x = x + F.scaled_dot_product_attention(q[:, :, text:], k[:, :, :text], v[:, :, :text] * w)
        return torch.cat([text_rows, edited_image_rows(q, k, v, text, own, x)], 2)

    def plain(self, func, *args, **kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        opts = kwargs.get("transformer_options") or {}
        where = (opts.get("block_type"), opts.get("block_index"))
        cross, own = self.cross.get(where), self.own.get(where)
        layout = opts.get(JOINT_LAYOUT)
        if (cross is None and own is None) or layout is None or COND not in opts.get("cond_or_uncond", ()):
            return self.plain(func, *args, **kwargs)  # the store keeps, and the edits change, the conditional half only
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        skip = bool(kwargs.get("skip_reshape", False))
        if kwargs.get("mask") is not None:  # e.g. Chroma's T5 padding mask: the parts would need it too
            raise RecordError(f"{getattr(self.controller, 'node', 'AttentionStore')}: this model masks its "
                              "joint attention (an attention mask, as Chroma's), which the pack cannot edit: use a "
                              "Flux.1 or SD3 model")
        latent_shape, text = layout.latent_shape, layout.text
        if (q.shape[2] if skip else q.shape[1]) < text + image_tokens(latent_shape, self.patch_size):
            return self.plain(func, *args, **kwargs)  # not the joint call
        if not skip:  # SD3: (B, L, heads * D), its values (B, L, heads, D): as Flux's (B, heads, L, D) views
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        ctl = self.controller
        if isinstance(ctl, Recorder):
            ctl.record_joint((cross or own).layer, cross is not None, own is not None, q, k, opts)
            return self.plain(func, *args, **kwargs)
        # parts that neither inject nor keep maps at this step run as ComfyUI would
        cross, own = (p if p is not None and not ctl.idle(p, opts) else None for p in (cross, own))
        if cross is None and own is None:
            return self.plain(func, *args, **kwargs)

        def plain(qc, kc, vc):  # a chunk that nothing edits: ComfyUI's attention (or the previous override's)
            rest = {name: a for name, a in kwargs.items() if name not in ("heads", "skip_reshape", "skip_output_reshape")}
            return self.plain(func, qc, kc, vc, heads, skip_reshape=True, skip_output_reshape=True, **rest)

        every = chunks(opts, q.shape[0])
        if len(every) == 1:  # the conditional half alone (Flux.1-dev's cfg 1; prompts of other lengths)
            src = ctl.joint_sources(cross, own, k, text, opts)
            if src is not None:
                return self.output([self.lean_rows(q, k, v, text, src)], kwargs)
        else:
            sources = [ctl.joint_sources(cross, own, chunk_rows(k, rows), text, opts) if cou == COND else None
                       for cou, rows in every]
            if any(s is not None for s in sources):  # the usual case: the lean path
                pieces = [self.lean_rows(*(t[rows] for t in (q, k, v)), text, src) if src is not None
                          else plain(*(t[rows] for t in (q, k, v))) for (_, rows), src in zip(every, sources)]
                return self.output(pieces, kwargs)
        # local blend (it keeps the call's token maps) or a recomputed source (it attends in the same batch):
        # the image->text part as a cross-attention, the image->image part as the image queries over the
        # whole sequence on the image values (joint.py), in the pack's layout (B, L, heads * D), except the
        # image values, which the image block reads in head layout.
        extra = dict(opts, n_heads=heads, original_shape=list(latent_shape))
        qi, k_all = join_heads(q[:, :, text:]), join_heads(k)
        parts = []
        if cross is not None:
            parts.append((cross, qi, k_all[:, :text], join_heads(v[:, :, :text])))
        if own is not None:
            parts.append((own, qi, k_all, v[:, :, text:]))
        plans = {p.kind: ctl.plan(p, qp, kp, vp, extra) for p, qp, kp, vp in parts}
        if all(jobs is None for plan in plans.values() for jobs, *_ in plan):
            return self.plain(func, *args, **kwargs)
        return self.output([self.rows(c, rows, q, k, v, heads, text, plans, plain)
                            for c, (_, rows) in enumerate(every)], kwargs)

    @staticmethod
    def output(pieces: list[torch.Tensor], kwargs: dict) -> torch.Tensor:
        """The chunks' head-layout outputs as the attention function returns them."""
        out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        return out if kwargs.get("skip_output_reshape", False) else join_heads(out)
