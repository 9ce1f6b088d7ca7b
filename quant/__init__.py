"""Quantization core: pure torch + safetensors. Never imports ComfyUI."""
