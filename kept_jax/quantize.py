"""Weight-only quantization of a model's linear layers, for decoding: int8 per output channel, int4 in groups.

The arithmetic (symmetric absmax scales, int4 storage) is qwix's array API (`qwix.quantize` / `qwix.dequantize`,
Google's JAX quantization library); what kept_jax adds is which tensors are quantized and the layout. Every linear
kernel of the tensor table (q/k/v/o, the MLP, Llamba's in_proj and out_proj; the untied head when asked) becomes a
`QArray` whose scales carry the layer axis, so a scanned model slices it per layer like any other parameter and
`Linear` dequantizes one layer's kernel inside the scan, next to its matmul. Norms, embeddings, Llamba's
convolution, D and biases stay in floating point, and so does every recurrent and cache state.

  int8  one scale per output channel (and layer): scale = max|w| / 127.5 over the input axis
  int4  one scale per group of `group_size` consecutive inputs per output channel: scale = max|w| / 7.5 over the group
"""

from __future__ import annotations

from kept_jax.errors import KeptError

# Commands read their choices from here before anything heavy loads (jax, flax and qwix load in the functions).

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)  # int4 groups along a kernel's input axis
DEFAULT_GROUP_SIZE = 64


def linear_kernel_paths(config, head: bool) -> list[tuple[str, ...]]:
    """Params paths of the linear kernels (2-D HF weights in the tensor table), the untied head only with `head`."""
    paths = {spec.params_path(config.scan_layers) for spec in config.tensor_table()
             if spec.path[-1] == "kernel" and len(spec.hf_shape) == 2}
    return sorted(p for p in paths if head or p[0] != "lm_head")


def check_scheme(scheme: str, group_size: int) -> None:
    if scheme not in SCHEMES:
        raise KeptError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise KeptError(f"int4 group size {group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")


def quantize_params(config, params: dict, scheme: str, group_size: int = DEFAULT_GROUP_SIZE,
                    head: bool = False) -> dict:
    """`params` with every linear kernel (see `linear_kernel_paths`) replaced by a qwix `QArray`."""
    import qwix
    from flax import traverse_util

    check_scheme(scheme, group_size)
    flat = traverse_util.flatten_dict(params)
    for path in linear_kernel_paths(config, head):
        kernel = flat[path]
        stacked = kernel.ndim == 3  # [layers, in, out] in the scanned layout
        d_in = kernel.shape[-2]
        if scheme == "int4" and d_in % group_size:
            raise KeptError(f"int4 group size {group_size} does not divide the input size {d_in} of "
                            f"{'/'.join(path)}; choose one of {', '.join(map(str, GROUP_SIZES))} that does")
        channels = (0, 2) if stacked else (1,)
        groups = {kernel.ndim - 2: group_size} if scheme == "int4" else None
        flat[path] = qwix.quantize(kernel, scheme, channelwise_axes=channels, tiled_axes=groups)
    return traverse_util.unflatten_dict(flat)


def is_quantized(x) -> bool:
    return hasattr(x, "qvalue") and hasattr(x, "scale")  # a qwix QArray (not imported for this)


def dequantize(kernel):
    """A quantized kernel as floats (the scales' dtype); any other array as it is."""
    if not is_quantized(kernel):
        return kernel
    import qwix

    return qwix.dequantize(kernel)


def weight_bytes(params: dict) -> int:
    """Bytes the parameters hold: int4 values at half a byte, scales and unquantized leaves at their dtype."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
        if is_quantized(leaf):
            bits = 4 if str(leaf.qtype) == "int4" else 8
            total += leaf.qvalue.size * bits // 8 + leaf.scale.size * leaf.scale.dtype.itemsize
        else:
            total += leaf.size * leaf.dtype.itemsize
    return total
