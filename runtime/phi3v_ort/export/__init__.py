"""Export a Phi-3-vision / Phi-3.5-vision checkpoint (a fine-tune included) into the release's ONNX layout.

Needs the `build` extra (torch, transformers, onnx, onnxscript, safetensors, peft). The runtime never imports it.
"""
