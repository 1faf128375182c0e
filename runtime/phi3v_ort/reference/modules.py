"""The transformers-side modules of Phi-3-vision: image embedding (CLIP ViT + HD layout + projection) and text
embedding, with the real checkpoint's parameter names.

These modules are the single source of the synthetic packages' vision and embedding weights (they are exported
to ONNX from here) and the torch reference the benchmarks compare against. Parameter names follow
`microsoft/Phi-3-vision-128k-instruct` under `model.vision_embed_tokens.` so the real safetensors load as is.

Requires torch and transformers (the `build` extra); nothing in the runtime imports this module.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from phi3v_ort.package import contract

CLIP_LAYER = -2  # Phi-3-V reads the penultimate CLIP layer's hidden states (img_processor layer_idx = -2)


class Phi3VImageEmbedding(nn.Module):
    """pixel_values [N, 17, 3, 336, 336] + image_sizes [N, 2] -> image_features [sum of image tokens, hidden].

    Crop 0 of each image is the global 336x336 view; crops 1..h*w are the HD sub-crops in row order; the rest is
    padding. Per image the output is: sub-crop tokens laid out as (h*12) rows of (w*12) tokens, each row
    followed by `sub_GN`; then `glb_GN`; then the global crop's 12 rows of 12 tokens, each row followed by
    `sub_GN` (Phi-3-V's "sub_glb" order), projected by a 2-layer MLP into the decoder's hidden size.
    """

    def __init__(self, clip_config: CLIPVisionConfig, hidden_size: int):
        super().__init__()
        self.img_processor = CLIPVisionModel(clip_config)
        dim = clip_config.hidden_size * 4  # 2x2 patch merge
        self.image_dim_out = clip_config.hidden_size
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.img_projection = nn.Sequential(nn.Linear(dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def crop_features(self, crops: torch.Tensor) -> torch.Tensor:
        """[B, 3, 336, 336] -> [B, 144, 4C]: CLIP patch features (penultimate layer, CLS dropped), merged 2x2."""
        hidden = self.img_processor(crops, output_hidden_states=True).hidden_states[CLIP_LAYER][:, 1:]
        b, n, c = hidden.shape
        side = int(n**0.5)  # 24
        half = side // 2
        merged = hidden.reshape(b, half, 2, half, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, half * half, 4 * c)
        return merged

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        num_crops = pixel_values.shape[1]
        feats = self.crop_features(pixel_values.flatten(0, 1))  # [N*17, 144, 4C]
        dim = feats.shape[-1]
        table = torch.cat([feats.reshape(-1, dim), self.sub_GN.reshape(1, dim), self.glb_GN.reshape(1, dim)], dim=0)
        index = layout_index(image_sizes, num_crops, sub_row=table.shape[0] - 2, glb_row=table.shape[0] - 1)
        return self.img_projection(table[index])


def layout_index(image_sizes: torch.Tensor, num_crops: int, sub_row: int, glb_row: int) -> torch.Tensor:
    """Row of the feature table for each output token of every image, in order (see Phi3VImageEmbedding).

    Pure integer arithmetic on tensors so the ONNX export stays dynamic in the image count and sizes.
    """
    per_crop = contract.TOKENS_PER_CROP
    grid = contract.NEWLINE_TOKENS_PER_ROW  # 12 tokens per crop row
    rows = image_sizes[:, 0].to(torch.int64) // contract.CROP_SIZE
    cols = image_sizes[:, 1].to(torch.int64) // contract.CROP_SIZE
    sub_width = cols * grid + 1  # a sub-crop token row plus its separator
    sub_len = rows * grid * sub_width
    glb_len = grid * (grid + 1)
    counts = sub_len + 1 + glb_len
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    pos = torch.arange(ends[-1], dtype=torch.int64)
    image = (pos.unsqueeze(1) >= ends.unsqueeze(0)).to(torch.int64).sum(1)
    q = pos - starts[image]
    base = image * (num_crops * per_crop)
    cols_i, sub_width_i, sub_len_i = cols[image], sub_width[image], sub_len[image]

    r, c = q // sub_width_i, q % sub_width_i
    crop = 1 + (r // grid) * cols_i + (c // grid)
    sub_index = torch.where(c == cols_i * grid, sub_row, base + crop * per_crop + (r % grid) * grid + (c % grid))

    g = q - sub_len_i - 1
    gr, gc = g // (grid + 1), g % (grid + 1)
    glb_index = torch.where(gc == grid, sub_row, base + gr * grid + gc)

    return torch.where(q < sub_len_i, sub_index, torch.where(q == sub_len_i, glb_row, glb_index))


class Phi3VTextEmbedding(nn.Module):
    """input_ids [B, S] (image positions hold -k for image k) + image_features [n, hidden] -> inputs_embeds.

    Image features fill the negative-id positions in order, as Phi-3-V's embedding does.
    """

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        is_image = input_ids < 0
        text = self.embed_tokens(input_ids.clamp(min=0))
        # A zero row at the end keeps the gather valid when there are no image features (every decode step).
        feats = torch.cat([image_features, torch.zeros_like(text[0, :1])], dim=0)
        order = torch.cumsum(is_image.reshape(-1).to(torch.int64), 0) - 1
        order = torch.where(is_image.reshape(-1), order, torch.full_like(order, 0) + image_features.shape[0])
        image = feats[order].reshape(text.shape)
        return torch.where(is_image.unsqueeze(-1), image, text)
