"""lightning_sae: sparse autoencoders, transcoders and their training recipes on PyTorch Lightning."""

__version__ = "0.1.0"
