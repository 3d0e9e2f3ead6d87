"""The Triton backend: fused kernels for CUDA tensors (and CPU under TRITON_INTERPRET=1)."""


def load() -> None:
    raise NotImplementedError("the triton backend is not implemented yet")
