"""``python -m qgoft_kernels``: the package's command line (``--help`` lists the commands).

- ``verify``: check every kernel path on this machine against float64;
- ``info``: the versions, the backend ``givens_rotate`` would use here and the optional packages;
- ``convert``: turn a ``qk.save_adapter`` file into a PEFT adapter folder, or back;
- ``upgrade``: rewrite an adapter (file or PEFT folder) of an older format version in the current one.
"""
from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qgoft_kernels",
        description="qgoft_kernels: fused Triton kernels for quasi-Givens orthogonal fine-tuning (qGOFT).",
        epilog="'python -m qgoft_kernels COMMAND --help' describes one command.")
    parser.add_argument("--version", action="version", version=f"qgoft-kernels {_version()}")
    parser.add_argument("--debug", action="store_true", help="on an error, print the whole traceback")
    # --debug after the command as well; SUPPRESS keeps a subcommand from resetting one given before it
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, print the whole traceback")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    verify = commands.add_parser("verify", parents=[debug],
                                 help="check every kernel path against a float64 oracle (PASS/FAIL table)",
                                 description="Check every kernel path (block kind x scale x direction x dtype) "
                                             "against float64: on a GPU the compiled kernels, else the Triton "
                                             "interpreter at small sizes. Exits 1 on any failure.")
    verify.add_argument("--seed", type=int, default=None, help="random seed (default: fresh, printed)")
    commands.add_parser("info", parents=[debug], help="versions, the backend used here, optional packages",
                        description="Print the package's version and adapter format versions, torch and triton, "
                                    "the backend givens_rotate(backend='auto') uses on this machine and which "
                                    "optional integrations (peft, transformers, bitsandbytes) can be imported.")
    convert = commands.add_parser(
        "convert", parents=[debug], help="qk.save_adapter file <-> PEFT adapter folder",
        description="Convert an adapter between the two formats: a .safetensors file written by "
                    "qk.save_adapter becomes a PEFT adapter folder (adapter_config.json + "
                    "adapter_model.safetensors), and a PEFT folder becomes a file. The direction follows "
                    "SOURCE: a folder is read as PEFT's, a file as qk.save_adapter's. Needs peft.")
    convert.add_argument("source", help="an adapter file (.safetensors) or a PEFT adapter folder")
    convert.add_argument("target", help="the folder (from a file) or the file (from a folder) to write")
    convert.add_argument("--base-model", default=None,
                         help="base_model_name_or_path to record in adapter_config.json (file -> folder only)")
    upgrade = commands.add_parser(
        "upgrade", parents=[debug], help="rewrite an adapter of an older format version in the current one",
        description="Read an adapter file or PEFT adapter folder of any format version this package reads "
                    "and write it again in the current version (in place unless --out).")
    upgrade.add_argument("source", help="an adapter file (.safetensors) or a PEFT adapter folder")
    upgrade.add_argument("--out", default=None, help="where to write (default: over SOURCE)")
    return parser


def _version() -> str:
    from ._version import __version__

    return __version__


def _info() -> int:
    import importlib

    import torch

    from .checkpoint import VERSION

    print(f"qgoft-kernels {_version()} (adapter file format {VERSION})")
    cuda = f"available: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "not available"
    print(f"torch {torch.__version__}; CUDA {cuda}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError as e:
        print(f"triton: not importable ({e})")
    if torch.cuda.is_available():
        backend = "Triton kernels (CUDA tensors)"
    elif os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on", "y"):
        backend = "Triton kernels in the interpreter (TRITON_INTERPRET is set; slow, for tests)"
    else:
        backend = "the PyTorch path (no CUDA; set TRITON_INTERPRET=1 before starting Python for the interpreter)"
    print(f"givens_rotate(backend='auto') on CPU tensors here: {backend}")
    for name, what in (("peft", "qgoft_kernels.peft (QGOFTConfig)"),
                       ("transformers", "Conv1D bases, qgoft_kernels.hf (Trainer, from_pretrained)"),
                       ("bitsandbytes", "8-bit and 4-bit bases")):
        try:
            module = importlib.import_module(name)
            print(f"{name} {getattr(module, '__version__', '?')}: {what}")
        except Exception as e:  # any import failure means the integration is unavailable
            print(f"{name}: not available ({type(e).__name__}: {e}); needed for {what}")
    return 0


def main(argv=None) -> int:
    """Run one command. A failure prints one line naming the problem (and the file) on stderr and
    exits 1; usage errors exit 2 (argparse); ``--debug`` shows the traceback instead."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.debug:
        return _run(args)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the command line's contract: one line, not a traceback (--debug has it)
        message = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, (OSError, ImportError)) or not isinstance(e, (ValueError, TypeError)):
            message = f"{type(e).__name__}: {message}"
        print(f"python -m qgoft_kernels {args.command}: error: {message} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


def _run(args) -> int:
    if args.command == "verify":
        import torch

        if not torch.cuda.is_available():
            # must be set before the kernels are defined (they are imported lazily)
            os.environ["TRITON_INTERPRET"] = "1"
        from .verify import main as verify

        return verify([] if args.seed is None else ["--seed", str(args.seed)])
    if args.command == "info":
        return _info()
    from .formats import convert, upgrade

    if args.command == "convert":
        for line in convert(args.source, args.target, base_model=args.base_model):
            print(line)
        return 0
    for line in upgrade(args.source, args.out):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
