"""Loader of the C++ CPU backend (fused kernels in ``kernels/csrc``)."""


def load() -> None:
    raise NotImplementedError("the cpp backend is not implemented yet")
