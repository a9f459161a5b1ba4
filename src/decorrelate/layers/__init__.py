from .unroll import unroll

__all__ = ["unroll"]
