"""The vision and embedding models: transformers-native torch modules (reference.py) loaded from the checkpoint and
exported to ONNX with the release's input and output names, weights in `<name>.onnx.data` beside each."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from phi3v_ort.package import contract
from phi3v_ort.reference.modules import Phi3VImageEmbedding, Phi3VTextEmbedding
from phi3v_ort.reference.model import construction, vision_targets
from phi3v_ort.reference.names import EMBED_TOKENS
from phi3v_ort.export.checkpoint import Checkpoint
from phi3v_ort.export.crop_axis import PIXEL_VALUES_AXES

OPSET = 17


def load_modules(ckpt: Checkpoint, adapter=None) -> tuple[Phi3VImageEmbedding, Phi3VTextEmbedding]:
    """The image embedding and the text embedding in float32, filled from the checkpoint (the vision tower and
    the token embedding only: a few hundred MB even for the full model), the adapter merged where it applies."""
    dec = ckpt.decoder_config()
    with construction(torch.float32, "cpu"):
        image = Phi3VImageEmbedding(ckpt.clip_config(), dec.hidden_size)
        text = Phi3VTextEmbedding(dec.vocab_size, dec.hidden_size)
    targets = {**vision_targets(image), EMBED_TOKENS: text.embed_tokens.weight}
    with torch.no_grad():
        for name, tensor in ckpt.iter_tensors(lambda n: n in targets):
            targets[name].copy_(adapter.merge(name, tensor) if adapter is not None else tensor)
    return image.eval(), text.eval()


def export_embeddings(checkpoint: str, family: str, adapter: str | None, staging: str, vision_file: str,
                      embedding_file: str, float16: bool) -> list[str]:
    """Vision and embedding models of the checkpoint into `staging`; returns the adapter targets merged here.
    The exporter runs this in a child process of its own, so the memory of the tracing is the system's again
    the moment it ends, before the decoder's builder starts."""
    import sys

    def log(msg: str) -> None:
        print(f"[export] {msg}", file=sys.stderr, flush=True)

    ckpt = Checkpoint.open(checkpoint, family)
    lora = None
    if adapter is not None:
        from phi3v_ort.reference.lora import LoraAdapter

        lora = LoraAdapter.open(adapter)
    log("vision and embedding: loading the vision tower and token embedding")
    image, text = load_modules(ckpt, lora)
    log(f"vision: exporting CLIP + HD layout + projection ({'fp16' if float16 else 'fp32'} I/O)")
    export_vision(image, Path(staging) / vision_file, float16)
    log("embedding: exporting")
    export_embedding(text, Path(staging) / embedding_file, float16)
    return sorted(lora.merged_names) if lora is not None else []


def save_onnx(model_proto, path: Path) -> None:
    """Save with all weights in `<name>.data` beside it, as the release does."""
    import onnx

    data = path.name + ".data"
    for stale in (path, path.with_name(data)):
        stale.unlink(missing_ok=True)
    onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=0)


def _export(module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_axes: dict) -> None:
    """torch.onnx.export on a small example with `dynamic_axes`, saved with its weights beside it."""
    import onnx

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, warnings.catch_warnings():
        # the tracer's notes on the HD layout's shape arithmetic: the layout is pure tensor arithmetic and the
        # exported graph is checked against the module for several image sizes (tests/synthetic/test_synthetic_build.py)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        tmp_path = Path(tmp) / "model.onnx"
        with torch.no_grad():
            torch.onnx.export(module, args, str(tmp_path), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False,
                              do_constant_folding=True)
        save_onnx(onnx.load(str(tmp_path)), path)


def export_vision(image: Phi3VImageEmbedding, path: Path, float16: bool) -> None:
    """The vision model: pixel_values [num_images, max_num_crops, 3, height, width], the crop axis dynamic as in
    the release (crop_axis.py).

    The trace runs on one image of two crops (17 crop slots would cost 17 CLIP forwards: 15 s on `small`, minutes
    on the full model); nothing in the module depends on the slot count but its shape arithmetic, which the
    tracer records as shape operations: tests/export/test_vision_crop_axis.py runs the exported graph against
    the torch module with every slot count."""
    module = image.half() if float16 else image
    dtype = torch.float16 if float16 else torch.float32
    pixel_values = torch.randn(1, 2, 3, contract.CROP_SIZE, contract.CROP_SIZE, dtype=dtype)
    image_sizes = torch.tensor([[336, 336]], dtype=torch.int64)
    names = contract.VISION_INPUTS
    out = contract.VISION_OUTPUTS["image_features"]
    _export(module, (pixel_values, image_sizes), path, [names["pixel_values"], names["image_sizes"]], [out],
            {names["pixel_values"]: PIXEL_VALUES_AXES, names["image_sizes"]: {0: "num_images"},
             out: {0: "num_image_tokens"}})


def export_embedding(text: Phi3VTextEmbedding, path: Path, float16: bool) -> None:
    module = text.half() if float16 else text
    dtype = torch.float16 if float16 else torch.float32
    hidden = text.embed_tokens.weight.shape[1]
    input_ids = torch.tensor([[1, 32010, -1, -1, -1, 29871, -2, -2, 13]], dtype=torch.int64)
    image_features = torch.randn(5, hidden, dtype=dtype)
    names = contract.EMBEDDING_INPUTS
    out = contract.EMBEDDING_OUTPUTS["inputs_embeds"]
    _export(module, (input_ids, image_features), path, [names["input_ids"], names["image_features"]], [out],
            {names["input_ids"]: {0: "batch_size", 1: "sequence_length"},
             names["image_features"]: {0: "num_image_tokens"},
             out: {0: "batch_size", 1: "sequence_length"}})
