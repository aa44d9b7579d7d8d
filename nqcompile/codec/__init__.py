"""Codec: E8 nearest point and fixed-rate lattice codes, scalar baselines, the registry of codecs a preset may
name (:mod:`nqcompile.codec.registry`), bit packing, one-byte scales, Hadamard rotation, RoPE
removal/re-application, and the key/value transforms built from them. Pure torch."""
