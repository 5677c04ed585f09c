"""The registered compressors. Importing this package fills the registry."""

from gradsieve.compressors import adaptive, dense, dgc, ef21, granular, predictive, regtopk, topk  # noqa: F401
