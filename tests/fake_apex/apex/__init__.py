"""Test stand-in for NVIDIA apex (see tests/fake_apex/README.md)."""
