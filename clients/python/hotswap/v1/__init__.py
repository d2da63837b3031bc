"""Generated from protos/hotswap/v1 by protos/generate.py; do not edit."""
