"""Sizes of the synthetic packages. `full` is Phi-3-vision's real shape; the others shrink only the widths/depths.

Every preset keeps the release's vocabulary (32064 ids, specials at the release's ids), LongRoPE with an
original context of 4096, the 336-px / 14-px CLIP geometry and the HD layout, so the processor and the runtime
see exactly what the release gives them.
"""

from __future__ import annotations

from dataclasses import dataclass

from phi3v_ort.package import contract


@dataclass(frozen=True)
class Preset:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    context_length: int
    clip_hidden_size: int
    clip_layers: int
    clip_heads: int
    clip_intermediate_size: int
    vocab_size: int = contract.VOCAB_SIZE
    original_context_length: int = contract.ORIGINAL_CONTEXT_LENGTH

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads


PRESETS = {
    # A few MB: the committed test fixture. A short context (still LongRoPE: 8192 > 4096) keeps the rotary
    # caches small and lets tests overflow the context with a modest prompt.
    "tiny": Preset("tiny", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64,
                   context_length=8192, clip_hidden_size=32, clip_layers=2, clip_heads=2, clip_intermediate_size=64),
    # Compute, not launch overhead, dominates on a CPU; the release's full context so max_length sizing matters.
    "small": Preset("small", hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=16, intermediate_size=2752,
                    context_length=contract.CONTEXT_LENGTH, clip_hidden_size=768, clip_layers=6, clip_heads=12,
                    clip_intermediate_size=3072),
    # The real dimensions: Phi-3-mini-128k decoder + CLIP ViT-L/14-336.
    "full": Preset("full", hidden_size=3072, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=8192,
                   context_length=contract.CONTEXT_LENGTH, clip_hidden_size=1024, clip_layers=24, clip_heads=16,
                   clip_intermediate_size=4096),
}
