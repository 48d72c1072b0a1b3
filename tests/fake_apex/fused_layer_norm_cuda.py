"""Stand-in for apex's compiled layer-norm extension: its presence is what
megatron_paci checks before offering the fused norms."""
