"""Activation files: the format, the streaming DataModule, and the commands that write them."""
