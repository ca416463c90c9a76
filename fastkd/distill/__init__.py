"""Distiller: teacher + student + feature pairs + losses -> one dict of named losses per step."""
from .distiller import Distiller, PairSpec, build_losses, check_pairs
from .models import build_model, load_state_dict_file, load_teacher, freeze

__all__ = ["Distiller", "PairSpec", "build_losses", "check_pairs", "build_model", "load_state_dict_file",
           "load_teacher", "freeze"]
