"""Checkpoint readers, writers and layout detection. Pure torch + safetensors."""
