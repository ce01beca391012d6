"""``python -m qgoft_kernels verify``: check every kernel path on this machine."""
import os
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "verify":
        print("usage: python -m qgoft_kernels verify [--seed N]", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        # must be set before the kernels are defined (they are imported lazily)
        os.environ["TRITON_INTERPRET"] = "1"
    from .verify import main as verify

    return verify(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
