"""Triton kernels behind the ops of :mod:`nqcompile.ops`, one module per kernel.

Each kernel is a ``torch.library.triton_op`` (its Triton launches wrapped in ``torch.library.wrap_triton``, so
Inductor sees them when the op appears in a compiled graph); the torch reference of every op stays the
implementation on CPU and for any shape a kernel does not cover (:mod:`nqcompile.ops.cuda` dispatches).

Modules (importing one imports Triton, an optional dependency: ``pip install nqcompile[triton]``):
    :mod:`.decode_attention`  ``nqcompile::e8_decode_attention``: split-K decode attention over E8 codes.
    :mod:`.dequant_kv`        ``nqcompile::e8_dequant_kv``: E8 codes back to float keys and values.
    :mod:`.lattice`           device functions the kernels share (E8 codewords, scales, RoPE angles).
    :mod:`.launch_configs`    the kernels' launch configurations: ``launch_table.json``, measured on a GPU by
                              ``benchmarks/tune_kernels.py``, looked up by shapes only (no autotuning at run time).

On a machine without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` set before the
kernel module is imported) on CPU tensors; that is how the tests check them there.
"""
