"""fastkd: fast feature knowledge distillation (MGD, CT, logit KD) for vision models."""
__version__ = "0.1.0"
