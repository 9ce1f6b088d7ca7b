"""Text and image encoders (umT5, CLIP vision): checkpoint key layouts and their mapping onto
ComfyUI's module names. Pure torch; no ComfyUI imports."""
