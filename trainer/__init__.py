"""Ratchet's trainer: corrections → examples → a LoRA adapter (PEFT) → a registered version.

It produces adapters; it never loads them into a server (that is serving's job).
"""
