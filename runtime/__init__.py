"""The host side: decoding loops, the pipelined runtime, serving, training and benchmarking on top of workers/."""
