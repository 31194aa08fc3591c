"""`python -m workers.kernels`: build the native kernels now (make install runs it)."""

from workers.kernels.native import main

main()
