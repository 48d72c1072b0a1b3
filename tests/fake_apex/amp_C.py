"""Stand-in for apex's compiled multi-tensor extension: its presence is what
megatron_paci checks before offering FusedAdam."""
