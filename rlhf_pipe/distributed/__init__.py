"""Running the roles on their own torchrun ranks."""
