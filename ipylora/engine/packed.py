"""Padding-free forward passes for trainers that build padded batches (DPO): the rows run as one packed row.

TRL's DPOTrainer puts a batch's chosen and rejected sequences in one right-padded tensor and scores
it through its fused LM head (`model(..., labels=labels, fused_lm_head=True)`, per-token
log-probabilities without the logits). TRL 1.16 turns DPO's own padding-free mode off, so every
sequence runs at the length of the batch's longest: with the usual spread of answer lengths a
third or more of the backbone's work is padding. `pack_padded_forward` wraps such a fused forward:
the real tokens of all rows go through the backbone as one row with position ids restarting per
sequence and their boundaries (`cu_seq_lens_*`) for the varlen attention kernel (speed.py), and
the per-token outputs are laid back out in the padded shape the trainer expects. The trainer's
loss code is untouched, and the LM head (which TRL already runs on real labels only) is the same.

Only for models whose attention is `ipylora_varlen` (speed.set_attention; on a GPU): any other
attention would let packed sequences see each other.
"""

from __future__ import annotations

PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")
"""The per-token outputs of TRL's fused LM head, each (rows, length - 1)."""


def pack_padded_forward(module) -> None:
    """Make `module.forward(input_ids=, attention_mask=, labels=, fused_lm_head=True)` run padding-free.

    `module` is one that TRL patched with `add_fused_lm_head` (the policy's base model, or a
    `ref_model`). Each row's real tokens must be one block (right-padded, or left- and
    right-padded); calls without the fused head (generation), with positions already given, or
    with gaps inside a row go to the original forward unchanged.
    """
    from ipylora.engine.speed import VARLEN

    if getattr(module.config, "_attn_implementation", None) != VARLEN:
        return
    inner = module.forward

    def forward(*args, fused_lm_head=False, **kwargs):
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
        if (not fused_lm_head or args or mask is None or ids is None or ids.dim() != 2
                or kwargs.get("position_ids") is not None or kwargs.get("labels") is None):
            return inner(*args, fused_lm_head=fused_lm_head, **kwargs)
        return _packed_call(inner, kwargs)

    module.forward = forward


def _packed_call(inner, kwargs: dict):
    import torch

    ids, mask, labels = kwargs.pop("input_ids"), kwargs.pop("attention_mask"), kwargs.pop("labels")
    keep = mask.bool()
    lengths = keep.sum(dim=1)
    # Each row's tokens must be one block (right padding as DPO's, left + right as GRPO's prompt + completion).
    starts_in_row = keep & ~torch.nn.functional.pad(keep[:, :-1], (1, 0), value=False)
    if bool((starts_in_row.sum(dim=1) > 1).any()):
        return inner(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, **kwargs)
    counts = lengths.tolist()  # one host sync: the boundaries go to the kernel as numbers
    total = sum(counts)
    starts = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(total, device=ids.device) - torch.repeat_interleave(starts, lengths, output_size=total)
    packed_labels = labels[keep].clone()
    # The fused head scores label t+1 from position t: a row's first token would be scored from the
    # previous row's last. It is never a target in the padded batch either (labels are shifted).
    packed_labels[starts[lengths > 0]] = -100
    cu = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    longest = max(counts) if counts else 0
    out = inner(input_ids=ids[keep][None], position_ids=positions[None], labels=packed_labels[None],
                fused_lm_head=True, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                max_length_k=longest, **kwargs)
    for field in PER_TOKEN_FIELDS:
        value = getattr(out, field, None)
        if value is not None:
            setattr(out, field, _unpack(value, keep))
    return out


def _unpack(value, keep):
    """A packed (1, total - 1) per-token tensor laid out as (rows, width - 1), zeros where there was padding.

    Packed position p holds the score of label p + 1, which for a row's tokens is the padded
    layout's (row, t) -> label (row, t + 1); a row's last position scores the next row's first
    token, masked above, so it is 0 as padding is (and for a row that ends at the last column
    it falls in the column the shifted layout drops).
    """
    import torch

    flat = torch.cat([value[0], value.new_zeros(1)])
    return flat.new_zeros(keep.shape).masked_scatter(keep, flat)[:, :-1]
