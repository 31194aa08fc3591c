"""The kernels of the forward pass, chosen per model (`Transformer.use_kernels`).

    "torch"   reference.py: PyTorch ops, the reference every other kernel is tested against.
    "native"  native.py + cpu_kernels.cpp (AVX2 + FMA, x86 CPUs): matrix products that stream
              the weights from memory once for all rows of a decode or tree step, each row's
              result independent of the other rows; fused RMSNorm and rotary embedding.
    "auto"    native where it runs (CPU, bfloat16 or float32, AVX2, extension built), else torch.
"""
