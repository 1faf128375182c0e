"""phi3v-ort: Phi-3-vision and Phi-3.5-vision on ONNX Runtime GenAI."""

__version__ = "0.1.0"
