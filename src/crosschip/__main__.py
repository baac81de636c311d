"""`python -m crosschip` (and `torchrun -m crosschip train ...`): the same CLI as the `crosschip` command."""

from crosschip.cli import main

main()
