"""amfs-dist: distributed meta-training for few-shot learning (AMFS, MAML, FO-MAML) on Ray."""

__version__ = "0.1.0"
