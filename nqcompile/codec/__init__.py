"""Codec: E8 nearest point and fixed-rate lattice codes, scalar baselines, bit packing, one-byte scales,
Hadamard rotation, RoPE removal/re-application, and the key/value transforms built from them. Pure torch."""
