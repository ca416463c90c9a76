"""Distiller: teacher + student + feature pairs + losses -> one dict of named losses per step."""
from .distiller import Distiller, PairSpec, build_losses, check_pairs

__all__ = ["Distiller", "PairSpec", "build_losses", "check_pairs"]
