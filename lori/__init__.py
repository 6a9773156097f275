"""lori: LoRA with Reduced Interference."""
