"""Adapters: PEFT files in, device-ready weights out, held in a two-tier cache."""
